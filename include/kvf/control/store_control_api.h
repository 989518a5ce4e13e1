// StoreControlApi: the ControlApi of one node, over that node's ChunkStore: what kvfabricd serves
// on its HTTP port. Lookups hash tokens with the topology's model (fingerprint and chunk size), the
// way engines do, and report the node's own store (tier dram, or ssd when the matched prefix
// reaches into the store's SSD tier) and, with peers set, what the other nodes' stores hold; pin,
// unpin and clear act on the store: all, the listed keys, or one model's entries (the name
// resolves through the topology to the fingerprint engines record with every chunk they store; an
// unknown name is kInvalidArgument naming the models there are); move goes to the peers (remote
// fetch between daemons); health, stats (one TierStats for DRAM, one for the SSD tier when the
// store has one) and metrics read it. Compress re-encodes entries (all, or the listed keys) with a
// codec of protocol/kv_codec.h, on the CPU, under a lease, and swaps the new bytes in
// (ChunkStore::commit_replacement): the chunk shape comes from the topology's model whose
// fingerprint the entry was stored under; an encoded entry is decoded first (identity makes it
// raw again, with whatever loss its codec had); an entry already in the codec is left as it is.
// Entries that cannot be re-encoded (unknown model, wrong size) are counted as failed with the
// reason; the others are done. Engines decode what they load (StoreConnector). Without peers,
// move is kUnavailable saying so.
// Thread-safe: every method may be called from several threads at once (the store is).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kvf/control/control_api.h"
#include "kvf/fabric/topology.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/store/chunk_store.h"

namespace kvf::control {

class StoreControlApi final : public ControlApi {
 public:
  // Extra Prometheus lines (e.g. the RPC server's counters), appended to metrics(); may be empty.
  using ExtraMetrics = std::function<std::string()>;

  // `topology` and `store` must outlive this object; `node` is a node of `topology`.
  StoreControlApi(const fabric::Topology& topology, std::string node, store::ChunkStore& store,
                  ExtraMetrics extra_metrics = {});

  // How this node reaches the other nodes' stores (the daemon's RemoteStore). Set before the API
  // serves requests.
  struct Peers {
    // Per other node: how many leading keys it holds (0 or unreachable: left out).
    std::function<std::vector<std::pair<std::string, size_t>>(const std::vector<ChunkKey>&)> lookup;
    std::function<Result<MoveResult>(const MoveRequest&)> move;
  };
  void set_peers(Peers peers) { peers_ = std::move(peers); }

  Result<LookupResult> lookup(const LookupRequest& request) override;
  Result<PinResult> pin(const PinRequest& request) override;
  Result<PinResult> unpin(const PinRequest& request) override;
  Result<ClearResult> clear(const ClearRequest& request) override;
  Result<MoveResult> move(const MoveRequest& request) override;
  Result<CompressResult> compress(const CompressRequest& request) override;
  HealthReport health() override;
  Result<ControlStats> stats() override;
  Result<std::string> metrics() override;

  // compress() of `keys` with a codec and its options (protocol::parse_codec_spec), for the
  // placement service, whose profiles name codecs with options.
  CompressResult compress_keys(const std::vector<ChunkKey>& keys, const protocol::KvCodecParams& params);
  // The chunk shape of the topology's model with that fingerprint (what codecs need, and the raw
  // size of its chunks); kNotFound for a fingerprint no model of the topology has.
  Result<protocol::KvChunkGeometry> geometry_of(const ChunkKey& model) const;

 private:
  // The topology's model of that name; kInvalidArgument listing the known ones.
  Result<const fabric::ModelSpec*> model_named(const std::string& name) const;
  // Re-encodes one entry with `params` under a lease (decoding it first when it is encoded) and
  // swaps it in (ChunkStore::commit_replacement); adds to `result`.
  Status recode(const ChunkKey& key, const protocol::KvCodecParams& params, uint64_t client,
                CompressResult& result);

  const fabric::Topology& topology_;
  std::string node_;
  store::ChunkStore& store_;
  ExtraMetrics extra_metrics_;
  Peers peers_;
  std::chrono::steady_clock::time_point started_;
  std::atomic<uint64_t> lookups_{0};
};

}  // namespace kvf::control
