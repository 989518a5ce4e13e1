// The daemon's JSON bodies, both ways: requests the router sends and the replies it reads back
// (control/json_reply.cpp writes them). A reply that does not have the expected shape is kMalformed,
// never an exception. Stateless functions; any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvf/protocol/status.h"
#include "kvf/router/router_results.h"

namespace kvf::router {

std::string lookup_body_tokens(std::string_view model, std::span<const uint32_t> tokens);
std::string lookup_body_keys(std::string_view model, std::span<const ChunkKey> keys);
std::string keys_body(std::span<const ChunkKey> keys);  // {"keys": [...]}
std::string clear_all_body();
std::string clear_model_body(std::string_view model);  // {"model": "..."}
std::string move_body(std::string_view from, std::string_view to, std::span<const ChunkKey> keys, bool copy);

// The node's own entry of a /lookup reply (a node with no match has none: zero chunks).
Result<NodeMatch> parse_lookup(std::string_view body, std::string_view node);
Result<PinCount> parse_pin(std::string_view body, bool pinned);
Result<ClearCount> parse_clear(std::string_view body);
Result<MoveCount> parse_move(std::string_view body);
Result<NodeHealth> parse_health(std::string_view body);
Result<NodeStats> parse_stats(std::string_view body);

// A non-2xx reply as a Status: the HTTP status picks the code (400 invalid_argument, 404 not_found,
// 503 unavailable, else internal) and the message is the daemon's own "error" text.
Status error_status(unsigned http_status, std::string_view body);

}  // namespace kvf::router
