// Strict decoding of the control API's JSON request bodies into ControlApi request structs. Every
// problem becomes a BadRequest naming the field (missing, unknown, wrong type, out of range,
// duplicate, conflicting) instead of an exception: nlohmann's throws stop here. Stateless free
// functions, safe from any thread.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "kvf/control/control_api.h"

namespace kvf::control {

// A request the server refuses, with what it puts in the reply.
struct BadRequest {
  unsigned http_status = 400;
  std::string code;     // machine-readable class: "malformed_json", "unknown_field", ...
  std::string message;  // for a person: what is wrong and what was expected
  std::string field;    // the offending field ("tokens[3]", "keys"); empty when not one field
};

// A decoded value or the reason it could not be decoded.
template <typename T>
class Checked {
 public:
  Checked(T value) : v_(std::move(value)) {}           // NOLINT: implicit by design
  Checked(BadRequest error) : v_(std::move(error)) {}  // NOLINT: implicit by design
  bool ok() const { return std::holds_alternative<T>(v_); }
  T& value() { return std::get<T>(v_); }
  const BadRequest& error() const { return std::get<BadRequest>(v_); }
  BadRequest&& take_error() { return std::get<BadRequest>(std::move(v_)); }

 private:
  std::variant<T, BadRequest> v_;
};

// Lookup and pin bodies of the common shape take a fast path (flat_json.h); every other body, and
// every refusal, goes through the full parser.
Checked<LookupRequest> decode_lookup(std::string_view body);
Checked<PinRequest> decode_pin(std::string_view body);  // also /unpin
Checked<ClearRequest> decode_clear(std::string_view body);
Checked<MoveRequest> decode_move(std::string_view body);
Checked<CompressRequest> decode_compress(std::string_view body);

// The full parser alone, without the fast path: tests check that both paths agree on every body.
Checked<LookupRequest> decode_lookup_full(std::string_view body);
Checked<PinRequest> decode_pin_full(std::string_view body);

// Limits on strings in request bodies (model, node and codec names).
inline constexpr size_t kMaxNameBytes = 256;

}  // namespace kvf::control
