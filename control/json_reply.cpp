// Results to JSON through nlohmann's value type; every dump replaces invalid UTF-8 (the default
// handler throws, and a reply must not fail because a client sent odd bytes we echo back).
#include "json_reply.h"

#include <algorithm>
#include <charconv>
#include <cstdint>

#include <nlohmann/json.hpp>

namespace kvf::control {
namespace {

using nlohmann::json;

std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

// A JSON string: plain printable ASCII is copied as it is; anything else (quotes, escapes, control
// bytes, UTF-8, invalid bytes) goes through nlohmann's escaping.
void append_string(std::string& out, std::string_view text) {
  const bool plain = std::all_of(text.begin(), text.end(), [](char c) {
    return static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) < 0x7f && c != '"' &&
           c != '\\';
  });
  if (plain) {
    out += '"';
    out += text;
    out += '"';
  } else {
    out += dump(json(text));
  }
}

void append_number(std::string& out, uint64_t value) {
  char digits[24];
  const auto end = std::to_chars(digits, digits + sizeof digits, value).ptr;
  out.append(digits, end);
}

json key_list(const std::vector<ChunkKey>& keys) {
  json out = json::array();
  for (const auto& key : keys) out.push_back(key.to_hex());
  return out;
}

}  // namespace

// Written by hand rather than through a JSON value: lookup is the hot route, and building a DOM of
// maps for a 150-byte reply cost about a tenth of a request. Same bytes as dump() would give (keys
// in sorted order).
std::string render_lookup(const LookupRequest& request, const LookupResult& result) {
  std::string out;
  out.reserve(64 + 112 * result.matches.size() + request.model.size());
  out += "{\"matches\":[";
  for (size_t i = 0; i < result.matches.size(); ++i) {
    const LookupMatch& m = result.matches[i];
    if (i != 0) out += ',';
    out += "{\"engine\":";
    append_string(out, m.engine);
    out += ",\"matched_chunks\":";
    append_number(out, m.matched_chunks);
    out += ",\"matched_tokens\":";
    append_number(out, m.matched_tokens);
    out += ",\"node\":";
    append_string(out, m.node);
    out += ",\"tier\":";
    append_string(out, tier_name(m.tier));
    out += '}';
  }
  out += "],\"model\":";
  append_string(out, request.model);
  out += ",\"query_chunks\":";
  append_number(out, result.query_chunks);
  out += '}';
  return out;
}

std::string render_pin(const PinResult& result, bool pinned) {
  return dump({{pinned ? "pinned" : "unpinned", result.changed}, {"not_found", key_list(result.not_found)}});
}

std::string render_clear(const ClearResult& result) {
  return dump({{"cleared", result.cleared}, {"freed_bytes", result.freed_bytes}});
}

std::string render_move(const MoveRequest& request, const MoveResult& result) {
  return dump({{"from", request.from},
               {"to", request.to},
               {"copy", request.copy},
               {"moved", result.moved},
               {"bytes", result.bytes},
               {"not_found", key_list(result.not_found)}});
}

std::string render_compress(const CompressRequest& request, const CompressResult& result) {
  return dump({{"codec", request.codec},
               {"compressed", result.compressed},
               {"unchanged", result.unchanged},
               {"failed", result.failed},
               {"bytes_before", result.bytes_before},
               {"bytes_after", result.bytes_after},
               {"not_found", key_list(result.not_found)},
               {"errors", result.errors}});
}

std::string render_health(const HealthReport& report) {
  return dump({{"status", report.healthy ? "ok" : "unhealthy"},
               {"node", report.node},
               {"version", report.version},
               {"uptime_s", report.uptime_s},
               {"problems", report.problems}});
}

std::string render_stats(const ControlStats& stats) {
  json tiers = json::array();
  for (const auto& t : stats.tiers) {
    tiers.push_back({{"tier", tier_name(t.tier)},
                     {"capacity_bytes", t.capacity_bytes},
                     {"used_bytes", t.used_bytes},
                     {"entries", t.entries},
                     {"hits", t.hits},
                     {"misses", t.misses},
                     {"evictions", t.evictions},
                     {"spills", t.spills},
                     {"promotions", t.promotions}});
  }
  return dump({{"node", stats.node},
               {"entries", stats.entries},
               {"pinned_entries", stats.pinned_entries},
               {"leased_entries", stats.leased_entries},
               {"lookups", stats.lookups},
               {"tiers", std::move(tiers)}});
}

std::string render_error(std::string_view code, std::string_view message, std::string_view field) {
  json body = {{"error", message}, {"code", code}};
  body["field"] = field.empty() ? json(nullptr) : json(field);
  return dump(body);
}

std::string render_error(const BadRequest& error) {
  return render_error(error.code, error.message, error.field);
}

}  // namespace kvf::control
