// Request decoding: parse once with nlohmann (exceptions caught here), then walk the value with
// checks that name the field. Our request schemas are flat objects, so only the top level needs
// field bookkeeping; anything nested is refused by the type checks.
#include "json_request.h"

#include "flat_json.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvf::control {
namespace {

using nlohmann::json;

BadRequest bad(std::string code, std::string message, std::string field = {}) {
  return BadRequest{400, std::move(code), std::move(message), std::move(field)};
}

// "[json.exception.parse_error.101] parse error at line 1, ..." -> "parse error at line 1, ...":
// the bracketed tag means nothing to a client.
std::string without_exception_tag(const char* what) {
  std::string text(what);
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find("] ");
    if (close != std::string::npos) text.erase(0, close + 2);
  }
  return text;
}

// Parses one JSON value. Duplicate keys in the top-level object are refused: nlohmann would keep
// the last silently, and a client that sends two values for one field has a bug worth surfacing.
Checked<json> parse_json(std::string_view body) {
  if (body.empty()) return bad("malformed_json", "empty body: expected a JSON object");
  int level = 0;  // nesting of objects and arrays; the top-level object's keys are at level 1
  std::unordered_set<std::string> top_keys;
  std::string duplicate;
  auto note_event = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        ++level;
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        --level;
        break;
      case json::parse_event_t::key:
        if (level == 1 && parsed.is_string()) {
          const auto& name = parsed.get_ref<const std::string&>();
          if (!top_keys.insert(name).second && duplicate.empty()) duplicate = name;
        }
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    json value = json::parse(body.begin(), body.end(), note_event);
    if (!duplicate.empty()) {
      return bad("duplicate_field", "field '" + duplicate + "' appears more than once", duplicate);
    }
    return value;
  } catch (const json::exception& e) {
    return bad("malformed_json", "malformed JSON: " + without_exception_tag(e.what()));
  }
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

using FieldNames = std::initializer_list<const char*>;

std::string list_names(FieldNames names) {
  std::string out;
  for (const char* name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

// The body as an object with no fields outside `allowed`.
Checked<const json*> top_object(const json& value, FieldNames allowed) {
  if (!value.is_object()) {
    return bad("wrong_type", std::string("body: expected a JSON object, got ") + value.type_name());
  }
  for (const auto& item : value.items()) {
    const std::string& name = item.key();
    if (std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return name == a; })) continue;
    std::string message = "unknown field '" + name + "'";
    const char* closest = nullptr;
    size_t best = 3;  // suggest only near misses (typos), not any field
    for (const char* candidate : allowed) {
      const size_t d = edit_distance(name, candidate);
      if (d < best) {
        best = d;
        closest = candidate;
      }
    }
    if (closest != nullptr) message += std::string(" (did you mean '") + closest + "'?)";
    message += "; expected fields: " + list_names(allowed);
    return bad("unknown_field", std::move(message), name);
  }
  return &value;
}

const json* field(const json& object, const char* name) {
  const auto it = object.find(name);
  return it == object.end() ? nullptr : &*it;
}

BadRequest missing(const char* name, std::string what) {
  return bad("missing_field", std::string("missing required field '") + name + "' (" + std::move(what) + ")",
             name);
}

BadRequest wrong_type(const std::string& path, const char* expected, const json& value) {
  return bad("wrong_type", path + ": expected " + expected + ", got " + value.type_name(), path);
}

// A model, node or codec name: a non-empty string of bounded length.
Checked<std::string> read_name(const json& object, const char* name) {
  const json* value = field(object, name);
  if (value == nullptr) return missing(name, "a non-empty string");
  if (!value->is_string()) return wrong_type(name, "a string", *value);
  const auto& text = value->get_ref<const std::string&>();
  if (text.empty()) return bad("invalid_value", std::string(name) + ": must not be empty", name);
  if (text.size() > kMaxNameBytes) {
    return bad("invalid_value",
               std::string(name) + ": longer than " + std::to_string(kMaxNameBytes) + " bytes", name);
  }
  return text;
}

Checked<std::vector<uint32_t>> read_tokens(const json& value, const char* name) {
  if (!value.is_array()) return wrong_type(name, "an array of token ids", value);
  std::vector<uint32_t> tokens;
  tokens.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    const json& item = value[i];
    if (item.is_number_unsigned()) {
      const auto id = item.get<uint64_t>();
      if (id > UINT32_MAX) {
        return bad("invalid_value",
                   std::string(name) + "[" + std::to_string(i) + "]: " + std::to_string(id) +
                       " is out of range (token ids are integers 0..4294967295)",
                   std::string(name) + "[" + std::to_string(i) + "]");
      }
      tokens.push_back(static_cast<uint32_t>(id));
      continue;
    }
    const std::string path = std::string(name) + "[" + std::to_string(i) + "]";
    if (item.is_number_integer()) {  // the parser stores only negative integers as signed
      return bad("invalid_value", path + ": token ids are non-negative, got " + item.dump(), path);
    }
    if (item.is_number_float()) {
      return bad("wrong_type", path + ": expected an integer token id, got " + item.dump(), path);
    }
    return wrong_type(path, "an integer token id", item);
  }
  return tokens;
}

Checked<std::vector<ChunkKey>> read_keys(const json& value, const char* name) {
  if (!value.is_array()) return wrong_type(name, "an array of chunk keys (32 hex digits each)", value);
  std::vector<ChunkKey> keys;
  keys.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    const json& item = value[i];
    const std::string path = std::string(name) + "[" + std::to_string(i) + "]";
    if (!item.is_string()) return wrong_type(path, "a chunk key string of 32 hex digits", item);
    auto key = ChunkKey::from_hex(item.get_ref<const std::string&>());
    if (!key.ok()) {
      const std::string& text = item.get_ref<const std::string&>();
      std::string why =
          text.size() != 32 ? std::to_string(text.size()) + " characters" : "a non-hex character";
      return bad("invalid_value", path + ": expected 32 hex digits, got " + why, path);
    }
    keys.push_back(*key);
  }
  return keys;
}

Checked<std::vector<ChunkKey>> read_required_keys(const json& object, const char* name) {
  const json* value = field(object, name);
  if (value == nullptr) return missing(name, "an array of chunk keys");
  return read_keys(*value, name);
}

// `all` must be the literal true when given: false would read as "clear nothing", which is never
// what a caller meant to send.
Checked<bool> read_all_flag(const json& object, const char* alternatives) {
  const json* value = field(object, "all");
  if (value == nullptr) return false;
  if (!value->is_boolean()) return wrong_type("all", "true", *value);
  if (!value->get<bool>()) {
    return bad("invalid_value",
               std::string("all: must be true when given (to act on less, send ") + alternatives + ")",
               "all");
  }
  return true;
}

// --- the fast path: accept the common shape when every check passes, else defer to the full parser

// The fields of a flat body by name, or false for an unknown or repeated name (the full parser
// then names it).
template <size_t N>
bool pick(std::vector<FlatField>& fields, const std::array<std::string_view, N>& names,
          std::array<FlatValue*, N>& slots) {
  for (auto& field : fields) {
    size_t i = 0;
    while (i < N && names[i] != field.name) ++i;
    if (i == N || slots[i] != nullptr) return false;
    slots[i] = &field.value;
  }
  return true;
}

bool fast_keys(const FlatValue& value, std::vector<ChunkKey>& out) {
  if (value.kind == FlatValue::Kind::kEmptyArray) return true;
  if (value.kind != FlatValue::Kind::kStrings) return false;
  out.reserve(value.strings.size());
  for (const auto& text : value.strings) {
    auto key = ChunkKey::from_hex(text);
    if (!key.ok()) return false;
    out.push_back(*key);
  }
  return true;
}

std::optional<LookupRequest> decode_lookup_fast(std::string_view body) {
  auto fields = scan_flat_object(body);
  if (!fields) return std::nullopt;
  std::array<FlatValue*, 4> slots{};
  if (!pick(*fields, std::array<std::string_view, 4>{"model", "tokens", "chunk_keys", "scope"}, slots))
    return std::nullopt;
  auto [model, tokens, keys, scope] = slots;
  if (model == nullptr || model->kind != FlatValue::Kind::kString || model->text.empty() ||
      model->text.size() > kMaxNameBytes || (tokens == nullptr) == (keys == nullptr)) {
    return std::nullopt;
  }
  LookupRequest request;
  if (scope != nullptr) {  // anything but the two words: the full parser names the problem
    if (scope->kind != FlatValue::Kind::kString || (scope->text != "node" && scope->text != "cluster")) {
      return std::nullopt;
    }
    request.cluster = scope->text == "cluster";
  }
  request.model = std::string(model->text);
  if (tokens != nullptr) {
    if (tokens->kind == FlatValue::Kind::kUints) {
      request.query = std::move(tokens->uints);
    } else if (tokens->kind == FlatValue::Kind::kEmptyArray) {
      request.query = std::vector<uint32_t>{};
    } else {
      return std::nullopt;
    }
  } else {
    std::vector<ChunkKey> chunk_keys;
    if (!fast_keys(*keys, chunk_keys)) return std::nullopt;
    request.query = std::move(chunk_keys);
  }
  return request;
}

std::optional<PinRequest> decode_pin_fast(std::string_view body) {
  auto fields = scan_flat_object(body);
  if (!fields) return std::nullopt;
  std::array<FlatValue*, 1> slots{};
  if (!pick(*fields, std::array<std::string_view, 1>{"keys"}, slots) || slots[0] == nullptr)
    return std::nullopt;
  PinRequest request;
  if (!fast_keys(*slots[0], request.keys)) return std::nullopt;
  return request;
}

}  // namespace

Checked<LookupRequest> decode_lookup(std::string_view body) {
  if (auto fast = decode_lookup_fast(body)) return std::move(*fast);
  return decode_lookup_full(body);
}

Checked<PinRequest> decode_pin(std::string_view body) {
  if (auto fast = decode_pin_fast(body)) return std::move(*fast);
  return decode_pin_full(body);
}

Checked<LookupRequest> decode_lookup_full(std::string_view body) {
  auto parsed = parse_json(body);
  if (!parsed.ok()) return parsed.take_error();
  auto object = top_object(parsed.value(), {"model", "tokens", "chunk_keys", "scope"});
  if (!object.ok()) return object.take_error();
  const json& o = *object.value();

  LookupRequest request;
  if (const json* scope = field(o, "scope"); scope != nullptr) {
    if (!scope->is_string()) return wrong_type("scope", "\"node\" or \"cluster\"", *scope);
    const auto& text = scope->get_ref<const std::string&>();
    if (text != "node" && text != "cluster") {
      return bad("invalid_value",
                 "scope: \"node\" (this node's store) or \"cluster\" (also the other nodes'), got \"" +
                     text.substr(0, 64) + "\"",
                 "scope");
    }
    request.cluster = text == "cluster";
  }
  auto model = read_name(o, "model");
  if (!model.ok()) return model.take_error();
  request.model = std::move(model.value());

  const json* tokens = field(o, "tokens");
  const json* keys = field(o, "chunk_keys");
  if (tokens != nullptr && keys != nullptr) {
    return bad("conflicting_fields", "send either 'tokens' or 'chunk_keys', not both", "chunk_keys");
  }
  if (tokens != nullptr) {
    auto ids = read_tokens(*tokens, "tokens");
    if (!ids.ok()) return ids.take_error();
    request.query = std::move(ids.value());
  } else if (keys != nullptr) {
    auto chunk_keys = read_keys(*keys, "chunk_keys");
    if (!chunk_keys.ok()) return chunk_keys.take_error();
    request.query = std::move(chunk_keys.value());
  } else {
    return bad("missing_field",
               "one of 'tokens' (token ids) or 'chunk_keys' (32 hex digits each) is required", "tokens");
  }
  return request;
}

Checked<PinRequest> decode_pin_full(std::string_view body) {
  auto parsed = parse_json(body);
  if (!parsed.ok()) return parsed.take_error();
  auto object = top_object(parsed.value(), {"keys"});
  if (!object.ok()) return object.take_error();
  auto keys = read_required_keys(*object.value(), "keys");
  if (!keys.ok()) return keys.take_error();
  return PinRequest{std::move(keys.value())};
}

Checked<ClearRequest> decode_clear(std::string_view body) {
  auto parsed = parse_json(body);
  if (!parsed.ok()) return parsed.take_error();
  auto object = top_object(parsed.value(), {"all", "model", "keys"});
  if (!object.ok()) return object.take_error();
  const json& o = *object.value();

  const size_t given = o.count("all") + o.count("model") + o.count("keys");
  if (given == 0) {
    return bad("missing_field", "one of 'all' (true), 'model' or 'keys' is required", "all");
  }
  if (given > 1) {
    return bad("conflicting_fields", "send exactly one of 'all', 'model' or 'keys'",
               o.count("keys") != 0 ? "keys" : "model");
  }
  ClearRequest request;
  if (o.count("all") != 0) {
    auto all = read_all_flag(o, "'model' or 'keys'");
    if (!all.ok()) return all.take_error();
    request.scope = ClearRequest::Scope::kAll;
  } else if (o.count("model") != 0) {
    auto model = read_name(o, "model");
    if (!model.ok()) return model.take_error();
    request.scope = ClearRequest::Scope::kModel;
    request.model = std::move(model.value());
  } else {
    auto keys = read_required_keys(o, "keys");
    if (!keys.ok()) return keys.take_error();
    request.scope = ClearRequest::Scope::kKeys;
    request.keys = std::move(keys.value());
  }
  return request;
}

Checked<MoveRequest> decode_move(std::string_view body) {
  auto parsed = parse_json(body);
  if (!parsed.ok()) return parsed.take_error();
  auto object = top_object(parsed.value(), {"from", "to", "keys", "copy"});
  if (!object.ok()) return object.take_error();
  const json& o = *object.value();

  MoveRequest request;
  auto from = read_name(o, "from");
  if (!from.ok()) return from.take_error();
  auto to = read_name(o, "to");
  if (!to.ok()) return to.take_error();
  if (from.value() == to.value()) {
    return bad("invalid_value", "to: the destination must differ from 'from' ('" + to.value() + "')", "to");
  }
  request.from = std::move(from.value());
  request.to = std::move(to.value());
  auto keys = read_required_keys(o, "keys");
  if (!keys.ok()) return keys.take_error();
  request.keys = std::move(keys.value());
  if (const json* copy = field(o, "copy"); copy != nullptr) {
    if (!copy->is_boolean()) return wrong_type("copy", "a boolean", *copy);
    request.copy = copy->get<bool>();
  }
  return request;
}

Checked<CompressRequest> decode_compress(std::string_view body) {
  auto parsed = parse_json(body);
  if (!parsed.ok()) return parsed.take_error();
  auto object = top_object(parsed.value(), {"keys", "all", "codec"});
  if (!object.ok()) return object.take_error();
  const json& o = *object.value();

  CompressRequest request;
  auto codec = read_name(o, "codec");
  if (!codec.ok()) return codec.take_error();
  request.codec = std::move(codec.value());
  const bool has_keys = o.count("keys") != 0;
  const bool has_all = o.count("all") != 0;
  if (has_keys && has_all) return bad("conflicting_fields", "send either 'keys' or 'all', not both", "all");
  if (!has_keys && !has_all) return bad("missing_field", "one of 'keys' or 'all' (true) is required", "keys");
  if (has_all) {
    auto all = read_all_flag(o, "'keys'");
    if (!all.ok()) return all.take_error();
    request.all = true;
  } else {
    auto keys = read_required_keys(o, "keys");
    if (!keys.ok()) return keys.take_error();
    request.keys = std::move(keys.value());
  }
  return request;
}

}  // namespace kvf::control
