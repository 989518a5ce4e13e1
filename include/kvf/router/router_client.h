// RouterClient: the embedded client a request router links to ask the cluster's kvfabricd daemons
// "which engine holds the longest cached prefix of these tokens?", and to pin, unpin, clear and move
// entries. It hashes tokens into chunk keys exactly as engines and daemons do, and talks HTTP/1.1
// to every node's control API over keep-alive connections (reopened when they fail).
//
// Thread rules: every method may be called from any thread. Calls are serialized on one mutex (one
// io_context drives all the node connections, and a call to several nodes runs them at once), so a
// router that wants lookups in parallel creates one RouterClient per worker thread; they are cheap.
// No method throws or blocks past RouterOptions::timeout on the data path: errors are values, per
// node. Creating a client (it resolves host names) is setup and may block.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/status.h"
#include "kvf/router/router_config.h"
#include "kvf/router/router_results.h"

namespace kvf::router {

class RouterClient {
 public:
  explicit RouterClient(RouterConfig config, RouterOptions options = {});
  ~RouterClient();
  RouterClient(const RouterClient&) = delete;
  RouterClient& operator=(const RouterClient&) = delete;

  // load the topology file; its problems, FILE:LINE:COL each, are the error.
  static Result<std::unique_ptr<RouterClient>> from_topology_file(const std::string& path,
                                                                  RouterOptions options = {});

  const RouterConfig& config() const;

  // The chunk keys of the full chunks of `tokens` for `model`, as engines key what they store
  // (protocol::ChunkHasher over the model's fingerprint and chunk size). No I/O.
  // kInvalidArgument when the configuration has no such model.
  Result<std::vector<ChunkKey>> chunk_keys(std::string_view model, std::span<const uint32_t> tokens) const;

  // Asks every node (or only `node`, when not empty) at once which prefix of `tokens` it holds.
  // Sends the chunk keys when the model is configured here, else the tokens (the daemons hash them).
  // Fails as a whole only for bad input (unknown model or node); a node down is one entry.
  Result<LookupReport> lookup(std::string_view model, std::span<const uint32_t> tokens,
                              std::string_view node = {});

  // The engine to send this prompt to: the longest matched prefix wins; ties go to the faster tier,
  // then to the role that can finish the request itself (both, then decode, then prefill), then to
  // the engine listed first in the configuration. With nothing matched anywhere: the first engine of
  // the model with role decode or both on a node that answered (any such engine when none did).
  // kNotFound when the configuration has no engine of the model to fall back to.
  Result<BestEngine> best_engine(std::string_view model, std::span<const uint32_t> tokens);

  // Per node (all, or only `node`). Pinned entries are never evicted until unpinned.
  Result<std::vector<NodeReply<PinCount>>> pin(std::span<const ChunkKey> keys, std::string_view node = {});
  Result<std::vector<NodeReply<PinCount>>> unpin(std::span<const ChunkKey> keys, std::string_view node = {});
  // Clears every entry (keys empty and all true) or the listed keys.
  Result<std::vector<NodeReply<ClearCount>>> clear_all(std::string_view node = {});
  Result<std::vector<NodeReply<ClearCount>>> clear_keys(std::span<const ChunkKey> keys,
                                                        std::string_view node = {});
  // Clears one model's entries (every chunk engines stored under its fingerprint). Each daemon
  // resolves the name through its topology: a name it does not know is that node's kInvalidArgument.
  Result<std::vector<NodeReply<ClearCount>>> clear_model(std::string_view model, std::string_view node = {});
  // Asks node `from`'s daemon to move (or copy) the entries to node `to`. The daemon's refusal (503
  // "not available yet" today) comes back as its status: kUnavailable and the daemon's own text.
  Result<MoveCount> move(std::string_view from, std::string_view to, std::span<const ChunkKey> keys,
                         bool copy = false);

  Result<std::vector<NodeReply<NodeHealth>>> health(std::string_view node = {});
  Result<std::vector<NodeReply<NodeStats>>> stats(std::string_view node = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::router
