#include "kvf/control/placement_service.h"

#include <pthread.h>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/kv_codec.h"

namespace kvf::control {
namespace {

// The service's leases (promotions) are its own: no engine connection has this id.
constexpr store::ClientId kPlacementClient = ~uint64_t{0} - 7;

Status policy_error(const std::string& path, const std::string& what) {
  return Status(ErrorCode::kInvalidArgument, "placement policy " + path + ": " + what);
}

// A number field, optional (`fallback` when absent), within [min, max]; `where` prefixes its name
// in errors ("profiles[2]." or "").
Result<double> number(const nlohmann::json& doc, const std::string& path, const std::string& where,
                      const char* field, double fallback, double min, double max) {
  if (!doc.contains(field)) return fallback;
  const nlohmann::json& v = doc.at(field);
  if (!v.is_number()) return policy_error(path, where + field + ": expected a number");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < min || x > max) {
    std::ostringstream range;
    range << where << field << ": " << x << " is outside [" << min << ", " << max << "]";
    return policy_error(path, range.str());
  }
  return x;
}

Result<std::vector<store::CodecProfile>> profiles_of(const nlohmann::json& doc, const std::string& path) {
  if (!doc.is_object() || !doc.contains("profiles") || !doc.at("profiles").is_array()) {
    return policy_error(path, "expected an object with a \"profiles\" list");
  }
  std::vector<store::CodecProfile> out;
  for (size_t i = 0; i < doc.at("profiles").size(); ++i) {
    const nlohmann::json& p = doc.at("profiles")[i];
    const std::string where = "profiles[" + std::to_string(i) + "]";
    if (!p.is_object() || !p.contains("name") || !p.at("name").is_string() || !p.contains("codec") ||
        !p.at("codec").is_string()) {
      return policy_error(path, where + ": expected an object with string \"name\" and \"codec\"");
    }
    store::CodecProfile profile;
    profile.name = p.at("name").get<std::string>();
    auto spec = protocol::parse_codec_spec(profile.name);
    auto codec = protocol::parse_codec(p.at("codec").get<std::string>());
    if (!codec.ok()) return policy_error(path, where + ".codec: " + codec.status().message());
    // A profile's name is its codec spec ("int4:r=32"), as kvfabric-codec-quality writes it; the
    // service encodes with it, so it must name the same codec.
    if (!spec.ok() || spec->codec != codec.value()) {
      return policy_error(path, where + ".name: '" + profile.name + "' is not a spec of codec " +
                                    p.at("codec").get<std::string>() + " (e.g. \"int4:r=32\")");
    }
    profile.codec = codec.value();
    if (!p.contains("size_ratio") || !p.contains("quality")) {
      return policy_error(path, where + ": \"size_ratio\" and \"quality\" are required");
    }
    auto ratio = number(p, path, where + ".", "size_ratio", 1, 1e-6, 2);
    auto quality = number(p, path, where + ".", "quality", 1, 0, 1);
    auto decode = number(p, path, where + ".", "decode_gbps", 0, 0, 1e6);
    for (const auto* r : {&ratio, &quality, &decode}) {
      if (!r->ok()) return r->status();
    }
    profile.size_ratio = ratio.value();
    profile.quality = quality.value();
    profile.decode_bytes_per_second = decode.value() * 1e9;
    out.push_back(std::move(profile));
  }
  if (out.empty()) return policy_error(path, "profiles: the list is empty");
  return out;
}

Result<nlohmann::json> read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status(ErrorCode::kNotFound, "placement policy " + path + ": cannot open it");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    return policy_error(path, std::string("not JSON: ") + e.what());
  }
}

}  // namespace

Result<std::vector<store::CodecProfile>> read_codec_profiles(const std::string& path) {
  auto doc = read_json(path);
  if (!doc.ok()) return doc.status();
  return profiles_of(doc.value(), path);
}

Result<PlacementPolicy> read_placement_policy(const std::string& path) {
  auto doc = read_json(path);
  if (!doc.ok()) return doc.status();
  auto profiles = profiles_of(doc.value(), path);
  if (!profiles.ok()) return profiles.status();
  PlacementPolicy policy;
  policy.planner.codecs = std::move(profiles.value());
  bool identity = false;
  for (const store::CodecProfile& p : policy.planner.codecs)
    identity = identity || p.codec == protocol::KvCodec::kIdentity;
  if (!identity) {
    return policy_error(path,
                        "profiles: no identity profile (what engines store, and what the plan starts from)");
  }
  const nlohmann::json& d = doc.value();
  auto weight = number(d, path, "", "delay_weight", 1.0, 0, 1e9);
  auto dram = number(d, path, "", "dram_gbps", 50, 1e-3, 1e6);
  auto ssd = number(d, path, "", "ssd_gbps", 2, 1e-3, 1e6);
  auto recompute = number(d, path, "", "recompute_us_per_token", 20, 0, 1e9);
  auto half_life = number(d, path, "", "reuse_half_life_s", 600, 1e-3, 1e9);
  auto base = number(d, path, "", "base_reuse", 0.5, 0, 1e9);
  auto fill = number(d, path, "", "dram_fill", 0.9, 0.01, 1);
  for (const auto* r : {&weight, &dram, &ssd, &recompute, &half_life, &base, &fill}) {
    if (!r->ok()) return r->status();
  }
  for (auto it = d.begin(); it != d.end(); ++it) {
    static const char* known[] = {
        "profiles",          "delay_weight", "dram_gbps", "ssd_gbps", "recompute_us_per_token",
        "reuse_half_life_s", "base_reuse",   "dram_fill"};
    bool ok = false;
    for (const char* k : known) ok = ok || it.key() == k;
    if (!ok) return policy_error(path, "unknown field \"" + it.key() + "\"");
  }
  policy.planner.delay_weight = weight.value();
  policy.planner.dram_bytes_per_second = dram.value() * 1e9;
  policy.planner.ssd_bytes_per_second = ssd.value() * 1e9;
  policy.recompute_seconds_per_token = recompute.value() * 1e-6;
  policy.reuse_half_life_seconds = half_life.value();
  policy.base_reuse = base.value();
  policy.dram_fill = fill.value();
  return policy;
}

std::string PlacementRound::to_string() const {
  std::ostringstream s;
  s << entries << " entries (" << planned << " planned, " << unplanned << " unplanned): " << recoded
    << " re-encoded, " << demoted << " demoted, " << promoted << " promoted, " << dropped << " dropped, "
    << failed << " failed; utility " << utility;
  return s.str();
}

PlacementService::PlacementService(const fabric::Topology& topology, store::ChunkStore& store,
                                   StoreControlApi& api, PlacementPolicy policy,
                                   std::chrono::milliseconds interval)
    : topology_(topology), store_(store), api_(api), policy_(std::move(policy)), interval_(interval) {
  if (interval_.count() > 0) thread_ = std::thread([this] { run(); });
}

PlacementService::~PlacementService() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void PlacementService::run() {
  pthread_setname_np(pthread_self(), "kvfd-placement");
  std::unique_lock lock(mu_);
  auto last = std::chrono::steady_clock::now();
  while (!wake_.wait_for(lock, interval_, [this] { return stop_; })) {
    lock.unlock();
    const auto now = std::chrono::steady_clock::now();
    const PlacementRound round = run_once(now - last);
    last = now;
    if (round.recoded + round.demoted + round.promoted + round.dropped + round.failed > 0) {
      spdlog::info("placement: {}", round.to_string());
    }
    lock.lock();
  }
}

PlacementRound PlacementService::run_once(std::chrono::duration<double> elapsed) {
  PlacementRound round;
  ++rounds_;
  const auto& codecs = policy_.planner.codecs;
  // Each model's raw chunk size and chunk tokens, by fingerprint.
  struct ModelCost {
    uint64_t raw_bytes = 0;
    double recompute_seconds = 0;
  };
  std::unordered_map<protocol::ChunkKey, ModelCost> models;
  for (const fabric::ModelSpec& m : topology_.models) {
    const protocol::ChunkKey fingerprint = protocol::model_fingerprint(m.name, m.layout);
    auto geometry = api_.geometry_of(fingerprint);
    if (!geometry.ok()) continue;
    models[fingerprint] =
        ModelCost{geometry->raw_bytes(), m.chunk_tokens * policy_.recompute_seconds_per_token};
  }
  const double decay = std::exp2(-elapsed.count() / policy_.reuse_half_life_seconds);

  std::vector<std::pair<protocol::ChunkKey, store::EntryInfo>> all = store_.entries();
  round.entries = all.size();
  std::vector<protocol::ChunkKey> keys;
  std::vector<store::PlannerEntry> entries;
  uint64_t pinned_bytes = 0;
  std::unordered_map<protocol::ChunkKey, Reuse> seen;
  for (const auto& [key, info] : all) {
    Reuse r = reuse_.count(key) ? reuse_.at(key) : Reuse{};
    const uint64_t fresh = info.loads >= r.loads_seen ? info.loads - r.loads_seen : info.loads;
    r.score = r.score * decay + static_cast<double>(fresh);
    r.loads_seen = info.loads;
    seen[key] = r;
    if (info.pins > 0) {
      pinned_bytes += info.tier == protocol::Tier::kDram ? info.bytes : 0;
      continue;
    }
    int current = store::kNotStored;
    for (size_t i = 0; i < codecs.size() && current == store::kNotStored; ++i) {
      if (codecs[i].codec == info.codec) current = static_cast<int>(i);
    }
    auto model = models.find(info.model);
    if (current == store::kNotStored || model == models.end()) {
      ++round.unplanned;
      continue;
    }
    store::PlannerEntry e;
    e.raw_bytes = model->second.raw_bytes;
    e.reuse = r.score + policy_.base_reuse;
    e.recompute_seconds = model->second.recompute_seconds;
    e.current = store::PlacementState{current, info.tier};
    keys.push_back(key);
    entries.push_back(e);
  }
  reuse_ = std::move(seen);  // forgets entries that are gone
  round.planned = entries.size();
  if (entries.empty()) return round;

  store::PlannerConfig config = policy_.planner;
  const auto capacity = static_cast<double>(store_.arena().size()) * policy_.dram_fill;
  config.dram_bytes = static_cast<uint64_t>(std::max(0.0, capacity - static_cast<double>(pinned_bytes)));
  config.ssd_bytes = store_.ssd_tier() != nullptr ? store_.ssd_tier()->capacity() : 0;
  store::PlanTotals totals;
  const std::vector<store::PlacementState> plan = store::plan_placement(config, entries, &totals);
  round.utility = totals.utility;

  // What changes, in an order that frees DRAM before anything needs more of it: drops, demotions
  // of entries that keep their codec, re-encodes of DRAM entries (then the demotions of those
  // planned for the SSD), promotions (then their re-encodes).
  std::vector<protocol::ChunkKey> drop, demote_now, demote_after;
  std::vector<protocol::ChunkKey> promote;
  std::map<int, std::vector<protocol::ChunkKey>> recode_now, recode_after;  // by planned profile
  for (size_t i = 0; i < plan.size(); ++i) {
    const store::PlacementState& want = plan[i];
    const store::PlacementState& have = entries[i].current;
    if (want.codec == store::kNotStored) {
      drop.push_back(keys[i]);
      continue;
    }
    const bool recode =
        codecs[static_cast<size_t>(want.codec)].codec != codecs[static_cast<size_t>(have.codec)].codec;
    if (have.tier == protocol::Tier::kDram) {
      if (recode) recode_now[want.codec].push_back(keys[i]);
      if (want.tier == protocol::Tier::kSsd) (recode ? demote_after : demote_now).push_back(keys[i]);
    } else if (want.tier == protocol::Tier::kDram) {
      promote.push_back(keys[i]);
      if (recode) recode_after[want.codec].push_back(keys[i]);
    }
    // An SSD entry planned to stay on the SSD in another codec is left: re-encoding would bring it
    // into DRAM and back for a smaller SSD footprint only.
  }

  auto note_failure = [&](const protocol::ChunkKey& key, const Status& why) {
    ++round.failed;
    spdlog::debug("placement: {}: {}", key.to_hex(), why.to_string());
  };
  if (!drop.empty()) round.dropped += store_.clear(drop).removed;
  auto demote = [&](const std::vector<protocol::ChunkKey>& which) {
    for (const protocol::ChunkKey& key : which) {
      if (Status s = store_.demote(key); s.ok()) {
        ++round.demoted;
      } else {
        note_failure(key, s);
      }
    }
  };
  auto recode = [&](const std::map<int, std::vector<protocol::ChunkKey>>& groups) {
    for (const auto& [profile, which] : groups) {
      auto params = protocol::parse_codec_spec(codecs[static_cast<size_t>(profile)].name);
      if (!params.ok()) {  // read_placement_policy checked every name
        round.failed += which.size();
        continue;
      }
      const CompressResult r = api_.compress_keys(which, params.value());
      round.recoded += r.compressed;
      round.failed += r.failed + r.not_found.size();
      for (const std::string& e : r.errors) spdlog::debug("placement: re-encoding: {}", e);
    }
  };
  demote(demote_now);
  recode(recode_now);
  demote(demote_after);
  for (const protocol::ChunkKey& key : promote) {
    auto lease = store_.acquire(key, kPlacementClient);  // an SSD entry is promoted by acquire
    if (!lease.ok()) {
      note_failure(key, lease.status());
      continue;
    }
    (void)store_.release(lease->id);
    ++round.promoted;
  }
  recode(recode_after);

  recoded_ += round.recoded;
  demoted_ += round.demoted;
  promoted_ += round.promoted;
  dropped_ += round.dropped;
  failed_ += round.failed;
  return round;
}

std::string PlacementService::metrics() const {
  std::ostringstream s;
  s << "# HELP kvfabric_placement_rounds_total Re-plans of codecs and tiers the daemon ran.\n"
    << "# TYPE kvfabric_placement_rounds_total counter\n"
    << "kvfabric_placement_rounds_total " << rounds_.load() << "\n"
    << "# HELP kvfabric_placement_changes_total Changes the re-plans applied, by kind.\n"
    << "# TYPE kvfabric_placement_changes_total counter\n"
    << "kvfabric_placement_changes_total{kind=\"recoded\"} " << recoded_.load() << "\n"
    << "kvfabric_placement_changes_total{kind=\"demoted\"} " << demoted_.load() << "\n"
    << "kvfabric_placement_changes_total{kind=\"promoted\"} " << promoted_.load() << "\n"
    << "kvfabric_placement_changes_total{kind=\"dropped\"} " << dropped_.load() << "\n"
    << "kvfabric_placement_changes_total{kind=\"failed\"} " << failed_.load() << "\n";
  return s.str();
}

}  // namespace kvf::control
