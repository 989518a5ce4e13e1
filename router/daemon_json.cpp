#include "daemon_json.h"

#include <exception>
#include <utility>

#include <nlohmann/json.hpp>

namespace kvf::router {
namespace {

using nlohmann::json;

json key_array(std::span<const ChunkKey> keys) {
  json out = json::array();
  for (const auto& key : keys) out.push_back(key.to_hex());
  return out;
}

Result<Tier> tier_of(const std::string& name) {
  return protocol::parse_tier(name);
}

Result<std::vector<ChunkKey>> keys_of(const json& array) {
  std::vector<ChunkKey> keys;
  for (const auto& item : array) {
    auto key = ChunkKey::from_hex(item.get<std::string>());
    if (!key.ok()) return key.status();
    keys.push_back(key.value());
  }
  return keys;
}

// Parses `body` and hands the object to `read`; a JSON error or a missing/mistyped field becomes
// kMalformed naming what was wrong.
template <typename T, typename Read>
Result<T> parse_object(std::string_view body, const char* what, Read read) {
  json doc = json::parse(body, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) {
    return Status(ErrorCode::kMalformed, std::string(what) + " reply is not a JSON object");
  }
  try {
    return read(doc);
  } catch (const std::exception& e) {
    return Status(ErrorCode::kMalformed, std::string(what) + " reply: " + e.what());
  }
}

std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace


std::string lookup_body_tokens(std::string_view model, std::span<const uint32_t> tokens) {
  // "scope": "node": the router asks every node itself, so each answers for its own store only.
  std::string out = dump(json{{"model", model}, {"scope", "node"}});
  out.pop_back();  // the token list is written by hand: prompts run to tens of thousands of tokens
  out += ",\"tokens\":[";
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i != 0) out += ',';
    out += std::to_string(tokens[i]);
  }
  out += "]}";
  return out;
}

std::string lookup_body_keys(std::string_view model, std::span<const ChunkKey> keys) {
  return dump({{"model", model}, {"scope", "node"}, {"chunk_keys", key_array(keys)}});
}

std::string keys_body(std::span<const ChunkKey> keys) {
  return dump({{"keys", key_array(keys)}});
}

std::string clear_all_body() {
  return R"({"all":true})";
}

std::string clear_model_body(std::string_view model) {
  return dump({{"model", model}});
}

std::string move_body(std::string_view from, std::string_view to, std::span<const ChunkKey> keys, bool copy) {
  return dump({{"from", from}, {"to", to}, {"keys", key_array(keys)}, {"copy", copy}});
}

Result<NodeMatch> parse_lookup(std::string_view body, std::string_view node) {
  return parse_object<NodeMatch>(body, "lookup", [&](const json& d) -> Result<NodeMatch> {
    NodeMatch match;
    match.query_chunks = d.at("query_chunks").get<uint32_t>();
    // The daemon answers for its node's store (engine ""); take the longest entry naming this node.
    for (const auto& m : d.at("matches")) {
      if (m.at("node").get<std::string>() != node) continue;
      const uint64_t tokens = m.at("matched_tokens").get<uint64_t>();
      if (tokens < match.matched_tokens) continue;
      auto tier = tier_of(m.at("tier").get<std::string>());
      if (!tier.ok()) return tier.status();
      match.matched_tokens = tokens;
      match.matched_chunks = m.at("matched_chunks").get<uint32_t>();
      match.tier = tier.value();
    }
    return match;
  });
}

Result<PinCount> parse_pin(std::string_view body, bool pinned) {
  return parse_object<PinCount>(body, pinned ? "pin" : "unpin", [&](const json& d) -> Result<PinCount> {
    PinCount count;
    count.changed = d.at(pinned ? "pinned" : "unpinned").get<uint64_t>();
    auto keys = keys_of(d.at("not_found"));
    if (!keys.ok()) return keys.status();
    count.not_found = std::move(keys.value());
    return count;
  });
}

Result<ClearCount> parse_clear(std::string_view body) {
  return parse_object<ClearCount>(body, "clear", [](const json& d) -> Result<ClearCount> {
    return ClearCount{d.at("cleared").get<uint64_t>(), d.at("freed_bytes").get<uint64_t>()};
  });
}

Result<MoveCount> parse_move(std::string_view body) {
  return parse_object<MoveCount>(body, "move", [](const json& d) -> Result<MoveCount> {
    MoveCount count;
    count.moved = d.at("moved").get<uint64_t>();
    count.bytes = d.at("bytes").get<uint64_t>();
    auto keys = keys_of(d.at("not_found"));
    if (!keys.ok()) return keys.status();
    count.not_found = std::move(keys.value());
    return count;
  });
}

Result<NodeHealth> parse_health(std::string_view body) {
  return parse_object<NodeHealth>(body, "health", [](const json& d) -> Result<NodeHealth> {
    NodeHealth health;
    health.healthy = d.at("status").get<std::string>() == "ok";
    health.version = d.at("version").get<std::string>();
    health.uptime_s = d.at("uptime_s").get<double>();
    health.problems = d.at("problems").get<std::vector<std::string>>();
    return health;
  });
}

Result<NodeStats> parse_stats(std::string_view body) {
  return parse_object<NodeStats>(body, "stats", [](const json& d) -> Result<NodeStats> {
    NodeStats stats;
    stats.entries = d.at("entries").get<uint64_t>();
    stats.pinned_entries = d.at("pinned_entries").get<uint64_t>();
    stats.leased_entries = d.at("leased_entries").get<uint64_t>();
    stats.lookups = d.at("lookups").get<uint64_t>();
    for (const auto& t : d.at("tiers")) {
      auto tier = tier_of(t.at("tier").get<std::string>());
      if (!tier.ok()) return tier.status();
      stats.tiers.push_back(TierCounters{tier.value(), t.at("capacity_bytes").get<uint64_t>(),
                                         t.at("used_bytes").get<uint64_t>(), t.at("entries").get<uint64_t>(),
                                         t.at("hits").get<uint64_t>(), t.at("misses").get<uint64_t>(),
                                         t.at("evictions").get<uint64_t>()});
    }
    return stats;
  });
}

Status error_status(unsigned http_status, std::string_view body) {
  ErrorCode code = ErrorCode::kInternal;
  if (http_status == 400) code = ErrorCode::kInvalidArgument;
  if (http_status == 404) code = ErrorCode::kNotFound;
  if (http_status == 503) code = ErrorCode::kUnavailable;
  std::string text;
  json doc = json::parse(body, nullptr, false);
  if (!doc.is_discarded() && doc.is_object() && doc.contains("error") && doc["error"].is_string()) {
    text = doc["error"].get<std::string>();
  } else {
    text = std::string(body.substr(0, 200));
  }
  return Status(code, "HTTP " + std::to_string(http_status) + ": " + text);
}

}  // namespace kvf::router
