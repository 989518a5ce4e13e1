#include "kvf/control/store_control_api.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>

#include "kvf/fabric/version.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/store/store_stats_fields.h"

namespace kvf::control {

StoreControlApi::StoreControlApi(const fabric::Topology& topology, std::string node, store::ChunkStore& store,
                                 ExtraMetrics extra_metrics)
    : topology_(topology),
      node_(std::move(node)),
      store_(store),
      extra_metrics_(std::move(extra_metrics)),
      started_(std::chrono::steady_clock::now()) {}

Result<const fabric::ModelSpec*> StoreControlApi::model_named(const std::string& name) const {
  const fabric::ModelSpec* model = topology_.find_model(name);
  if (model == nullptr) {
    std::string known;
    for (const auto& m : topology_.models) known += (known.empty() ? "" : ", ") + m.name;
    return Status(ErrorCode::kInvalidArgument, "unknown model '" + name + "' (the topology has: " +
                                                   (known.empty() ? "none" : known) + ")");
  }
  return model;
}

Result<LookupResult> StoreControlApi::lookup(const LookupRequest& request) {
  lookups_.fetch_add(1, std::memory_order_relaxed);
  auto named = model_named(request.model);
  if (!named.ok()) return named.status();
  const fabric::ModelSpec* model = named.value();
  std::vector<ChunkKey> hashed;
  if (request.by_tokens()) {
    const protocol::ChunkHasher hasher(protocol::model_fingerprint(model->name, model->layout),
                                       model->chunk_tokens);
    hashed = hasher.hash(request.tokens());
  }
  const std::vector<ChunkKey>& keys = request.by_tokens() ? hashed : request.chunk_keys();
  LookupResult result;
  result.query_chunks = static_cast<uint32_t>(keys.size());
  // The slowest tier the matched prefix reaches into: ssd when any of its chunks is there.
  const std::vector<Tier> tiers = keys.empty() ? std::vector<Tier>{} : store_.lookup_tiers(keys);
  const size_t matched = tiers.size();
  if (matched > 0) {
    const Tier deepest = *std::max_element(tiers.begin(), tiers.end());
    result.matches.push_back(LookupMatch{node_, "", static_cast<uint64_t>(matched) * model->chunk_tokens,
                                         static_cast<uint32_t>(matched), deepest});
  }
  // The rest of the cluster: what a local miss (or a shorter local prefix) could fetch instead.
  if (request.cluster && peers_.lookup && !keys.empty() && matched < keys.size()) {
    for (const auto& [node, held] : peers_.lookup(keys)) {
      if (held == 0) continue;
      result.matches.push_back(LookupMatch{node, "", static_cast<uint64_t>(held) * model->chunk_tokens,
                                           static_cast<uint32_t>(held), Tier::kDram});
    }
    std::stable_sort(
        result.matches.begin(), result.matches.end(),
        [](const LookupMatch& a, const LookupMatch& b) { return a.matched_tokens > b.matched_tokens; });
  }
  return result;
}

Result<PinResult> StoreControlApi::pin(const PinRequest& request) {
  PinResult result;
  for (const auto& key : request.keys) {
    Status s = store_.pin(key);
    if (s.ok()) {
      ++result.changed;
    } else if (s.code() == ErrorCode::kNotFound) {
      result.not_found.push_back(key);
    } else {
      return s;
    }
  }
  return result;
}

Result<PinResult> StoreControlApi::unpin(const PinRequest& request) {
  PinResult result;
  for (const auto& key : request.keys) {
    Status s = store_.unpin(key);
    if (s.ok()) {
      ++result.changed;
    } else if (s.code() == ErrorCode::kNotFound) {
      result.not_found.push_back(key);
    } else if (s.code() != ErrorCode::kInvalidArgument) {  // held but not pinned: nothing changed
      return s;
    }
  }
  return result;
}

Result<ClearResult> StoreControlApi::clear(const ClearRequest& request) {
  store::ClearResult r;
  switch (request.scope) {
    case ClearRequest::Scope::kAll:
      r = store_.clear_all();
      break;
    case ClearRequest::Scope::kKeys:
      r = store_.clear(request.keys);
      break;
    case ClearRequest::Scope::kModel: {
      // Engines record the fingerprint they hash keys with (the model's name and KV geometry) with
      // every chunk they store; the topology's model gives the same fingerprint.
      auto model = model_named(request.model);
      if (!model.ok()) return model.status();
      r = store_.clear_model(protocol::model_fingerprint(model.value()->name, model.value()->layout));
      break;
    }
  }
  return ClearResult{r.removed, r.bytes};
}

Result<MoveResult> StoreControlApi::move(const MoveRequest& request) {
  if (!peers_.move) {
    return Status(ErrorCode::kUnavailable, "move is not available: this kvfabricd runs without peers");
  }
  return peers_.move(request);
}

Result<protocol::KvChunkGeometry> StoreControlApi::geometry_of(const ChunkKey& model) const {
  for (const fabric::ModelSpec& m : topology_.models) {
    if (protocol::model_fingerprint(m.name, m.layout) != model) continue;
    const protocol::KvLayoutDesc& d = m.layout;
    protocol::KvChunkGeometry g;
    g.layers = d.num_layers;
    g.parts = d.kind == protocol::KvLayoutKind::kMla ? 1 : 2;
    g.block_tokens = d.block_tokens;
    g.blocks = d.block_tokens == 0 ? 0 : m.chunk_tokens / d.block_tokens;
    g.channels = d.kv_heads * d.head_dim;
    g.dtype_bytes = d.dtype_bytes;
    if (Status st = g.validate(); !st.ok()) {
      return Status(ErrorCode::kInvalidArgument, "model '" + m.name + "': " + st.message());
    }
    return g;
  }
  return Status(
      ErrorCode::kNotFound,
      "the entry's model fingerprint is not a model of the topology (stored by an engine of another "
      "model, or without one): its chunk shape is unknown");
}

Status StoreControlApi::recode(const ChunkKey& key, const protocol::KvCodecParams& params, uint64_t client,
                               CompressResult& result) {
  // Already in that codec: nothing to do, and no lease (which would promote an SSD entry).
  if (auto info = store_.peek(key); info && info->codec == params.codec) {
    result.bytes_before += info->bytes;
    result.bytes_after += info->bytes;
    ++result.unchanged;
    return Status::Ok();
  }
  auto lease = store_.acquire(key, client);
  if (!lease.ok()) return lease.status();
  struct Release {
    store::ChunkStore& store;
    uint64_t id;
    ~Release() { (void)store.release(id); }
  } release{store_, lease->id};
  if (lease->codec == params.codec) {  // re-encoded by someone else meanwhile
    result.bytes_before += lease->length;
    result.bytes_after += lease->length;
    ++result.unchanged;
    return Status::Ok();
  }
  auto geometry = geometry_of(lease->model);
  if (!geometry.ok()) return geometry.status();
  const std::span<const uint8_t> stored = store_.bytes(*lease);
  if (Status st = store_.verify(*lease); !st.ok()) return st;
  // The raw chunk: the stored bytes, or what an earlier codec's bytes decode to (a lossy codec's
  // loss stays; the new codec encodes what the engines would have loaded).
  std::vector<uint8_t> decoded;
  std::span<const uint8_t> raw = stored;
  if (lease->codec != protocol::KvCodec::kIdentity) {
    decoded.resize(geometry->raw_bytes());
    if (Status st = gpudirect::decode_chunk(stored, decoded); !st.ok()) return st;
    raw = decoded;
  } else if (stored.size() != geometry->raw_bytes()) {
    return Status(ErrorCode::kInvalidArgument,
                  "the entry holds " + std::to_string(stored.size()) + " bytes, not the " +
                      std::to_string(geometry->raw_bytes()) + " of its model's chunk shape");
  }
  std::vector<uint8_t> encoded;
  if (params.codec == protocol::KvCodec::kIdentity) {
    encoded.assign(raw.begin(), raw.end());
  } else {
    auto bound = gpudirect::max_encoded_bytes(params, *geometry);
    if (!bound.ok()) return bound.status();
    encoded.resize(*bound);
    auto n = gpudirect::encode_chunk(params, *geometry, raw, encoded);
    if (!n.ok()) return n.status();
    encoded.resize(*n);
  }
  auto reservation = store_.reserve_replacement(key, encoded.size(), params.codec, client);
  if (!reservation.ok()) return reservation.status();
  std::memcpy(store_.bytes(*reservation).data(), encoded.data(), encoded.size());
  if (Status st = store_.commit_replacement(key, reservation->id); !st.ok()) {
    (void)store_.abort(key, reservation->id);
    return st;
  }
  result.bytes_before += lease->length;
  result.bytes_after += encoded.size();
  ++result.compressed;
  return Status::Ok();
}

Result<CompressResult> StoreControlApi::compress(const CompressRequest& request) {
  auto codec = protocol::parse_codec(request.codec);
  if (!codec.ok()) return Status(ErrorCode::kInvalidArgument, codec.status().message());
  protocol::KvCodecParams params;
  params.codec = codec.value();
  return compress_keys(request.all ? store_.keys() : request.keys, params);
}

CompressResult StoreControlApi::compress_keys(const std::vector<ChunkKey>& keys,
                                              const protocol::KvCodecParams& params) {
  static std::atomic<uint64_t> next_client{1};
  const uint64_t client = (uint64_t{3} << 62) | next_client.fetch_add(1);
  CompressResult result;
  for (const ChunkKey& key : keys) {
    Status st = recode(key, params, client, result);
    if (st.ok()) continue;
    if (st.code() == ErrorCode::kNotFound && !store_.peek(key)) {
      result.not_found.push_back(key);  // not stored (or gone meanwhile)
      continue;
    }
    ++result.failed;
    if (result.errors.size() < 8) result.errors.push_back(st.message());
  }
  return result;
}

HealthReport StoreControlApi::health() {
  HealthReport report;
  report.node = node_;
  report.version = std::string(fabric::version());
  report.uptime_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  const store::StoreStats s = store_.stats();
  if (Status st = store::check_stats_invariants(s); !st.ok()) {
    report.problems.push_back("store stats inconsistent: " + st.message());
  }
  report.healthy = report.problems.empty();
  return report;
}

Result<ControlStats> StoreControlApi::stats() {
  const store::StoreStats s = store_.stats();
  ControlStats out;
  out.node = node_;
  out.pinned_entries = s.pinned;
  out.leased_entries = s.leased_entries;
  out.lookups = lookups_.load(std::memory_order_relaxed);
  out.entries = s.entries + s.ssd_entries;
  // Per tier, a miss is a key that tier did not hold: DRAM missed what the SSD then served too.
  out.tiers.push_back(TierStats{Tier::kDram, s.capacity_bytes, s.bytes_used, s.entries, s.hits,
                                s.misses + s.ssd_hits, s.evictions, s.ssd_spills, s.promotions});
  if (s.ssd_capacity_bytes > 0) {
    out.tiers.push_back(TierStats{Tier::kSsd, s.ssd_capacity_bytes, s.ssd_bytes_used, s.ssd_entries,
                                  s.ssd_hits, s.ssd_misses, s.ssd_evictions, s.ssd_spills, s.promotions});
  }
  return out;
}

Result<std::string> StoreControlApi::metrics() {
  const store::StoreStats s = store_.stats();
  std::string out;
  for (const auto& f : store::store_stats_fields()) {
    const std::string name = "kvf_store_" + std::string(f.name) + (f.counter ? "_total" : "");
    out += "# HELP " + name + " " + std::string(f.help) + "\n";
    out += "# TYPE " + name + (f.counter ? " counter\n" : " gauge\n");
    out += name + " " + std::to_string(s.*f.member) + "\n";
  }
  out += "# HELP kvf_control_lookups_total Lookups served by the control API.\n";
  out += "# TYPE kvf_control_lookups_total counter\n";
  out += "kvf_control_lookups_total " + std::to_string(lookups_.load(std::memory_order_relaxed)) + "\n";
  if (extra_metrics_) out += extra_metrics_();
  return out;
}

}  // namespace kvf::control
