// JSON renderings of the ControlApi's results and of refusals, as the HTTP server sends them.
// Rendering never throws: text from clients (field names, model names) may hold invalid UTF-8,
// which is replaced rather than allowed to abort the reply. Free functions, safe from any thread.
#pragma once

#include <string>
#include <string_view>

#include "json_request.h"
#include "kvf/control/control_api.h"

namespace kvf::control {

std::string render_lookup(const LookupRequest& request, const LookupResult& result);
std::string render_pin(const PinResult& result, bool pinned);  // pinned=false: an unpin result
std::string render_clear(const ClearResult& result);
std::string render_move(const MoveRequest& request, const MoveResult& result);
std::string render_compress(const CompressRequest& request, const CompressResult& result);
std::string render_health(const HealthReport& report);
std::string render_stats(const ControlStats& stats);

// {"error": message, "field": field or null, "code": code}
std::string render_error(std::string_view code, std::string_view message, std::string_view field = {});
std::string render_error(const BadRequest& error);

}  // namespace kvf::control
