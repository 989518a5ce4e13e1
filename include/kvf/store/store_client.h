// StoreClient: an engine's handle on its node's prefix store in kvfabricd. It talks to the daemon
// over the daemon's Unix socket (store RPC: metadata only) and maps the store arena itself, so
//   put = reserve -> the engine writes into the mapped arena (memcpy or DMA) -> commit
//   get = acquire a lease -> the engine reads from the mapping -> release
// and no chunk byte is copied through the daemon.
// Errors are values and no call hangs: every call has a deadline (kTimeout), a daemon that is down
// gives kUnavailable at once, a connection that breaks mid-call gives kPeerLost; the next call
// connects again (and maps the new daemon's arena if it changed). Reservations and leases belong to
// the connection that made them: after a reconnect the daemon has freed them, and using one gives
// kPeerLost instead of touching the new arena.
// Thread rules: every method may be called from any thread; calls are serialized on the one
// connection. Spans returned by bytes() stay valid for the client's lifetime (an arena replaced by
// a reconnect stays mapped until the client is destroyed), but only while the reservation or lease
// is live do they hold the chunk.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/status.h"
#include "kvf/store/chunk_store.h"
#include "kvf/store/store_stats.h"

namespace kvf::store {

struct StoreClientOptions {
  std::string socket_path;                          // the daemon's, e.g. /tmp/kvfabric-local.sock
  std::string client_name;                          // shown in the daemon's log
  std::chrono::milliseconds call_timeout{5000};     // send + daemon work + reply, per call
  std::chrono::milliseconds connect_timeout{1000};  // connect + hello + mapping the arena
};

// A reservation or lease, tagged with the connection it was made on.
struct ClientReservation {
  Reservation reservation;
  uint64_t connection = 0;
};
struct ClientLease {
  Lease lease;
  uint64_t connection = 0;
};

struct ClientClearResult {
  uint64_t removed = 0;
  uint64_t deferred = 0;  // of those, entries freed only when their readers release them
  uint64_t bytes = 0;
};

class StoreClient {
 public:
  // Does not connect: the first call does (so an engine may start before its daemon).
  explicit StoreClient(StoreClientOptions options);
  ~StoreClient();
  StoreClient(const StoreClient&) = delete;
  StoreClient& operator=(const StoreClient&) = delete;

  // Connects now if not connected (calls do this on their own).
  Status connect();
  bool connected() const;
  std::string node() const;  // from the last hello; empty before
  uint64_t arena_bytes() const;
  // The current arena as mapped in this process (empty before the first connect), for an engine
  // that registers it once with CUDA (cudaHostRegister) or a NIC so that it can DMA into chunks.
  // A reconnect to another daemon maps a new arena; the old mapping stays until the client is
  // destroyed, so a registration of it stays valid memory until then.
  std::span<uint8_t> arena() const;

  // --- put ---
  // `model`: the fingerprint `key` was hashed with (ChunkHasher::model()); the daemon keeps it with
  // the entry so that clearing a model finds its chunks. Zero records none. `codec`: how the bytes
  // are encoded (kv_codec.h); kept with the entry and reported by every lease of it.
  // Errors: kAborted when the key is stored or being stored (nothing to do), kOutOfMemory, and the
  // connection errors above.
  Result<ClientReservation> reserve(const protocol::ChunkKey& key, uint64_t bytes,
                                    const protocol::ChunkKey& model = {},
                                    protocol::KvCodec codec = protocol::KvCodec::kIdentity);
  // The reservation's bytes in the mapped arena; empty when it belongs to an older connection.
  std::span<uint8_t> bytes(const ClientReservation& r) const;
  Status commit(const ClientReservation& r);
  Status abort(const ClientReservation& r);
  // reserve -> memcpy -> commit (abort when the copy cannot be made). kAborted: already stored.
  Status put(const protocol::ChunkKey& key, std::span<const uint8_t> data,
             const protocol::ChunkKey& model = {}, protocol::KvCodec codec = protocol::KvCodec::kIdentity);

  // --- get ---
  // How many leading keys of the chain the store holds (in DRAM or its SSD tier: an acquire of a
  // key in the SSD tier loads it into the arena first, which takes a read of the chunk).
  Result<size_t> lookup(std::span<const protocol::ChunkKey> keys);
  Result<ClientLease> acquire(const protocol::ChunkKey& key);
  std::span<const uint8_t> bytes(const ClientLease& l) const;
  Status release(const ClientLease& l);
  // acquire -> `read` over the leased bytes in the mapping -> release. The lease is released even
  // when `read` returns an error; that error is returned.
  Status get(const protocol::ChunkKey& key, const std::function<Status(std::span<const uint8_t>)>& read);

  // --- control ---
  Status pin(const protocol::ChunkKey& key);
  Status unpin(const protocol::ChunkKey& key);
  Result<ClientClearResult> clear_all();
  Result<ClientClearResult> clear(std::span<const protocol::ChunkKey> keys);
  // The entries stored under a model fingerprint (zero: those stored without one).
  Result<ClientClearResult> clear_model(const protocol::ChunkKey& model);
  Result<StoreStats> stats();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::store
