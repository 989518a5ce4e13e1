// ControlRouter: the table of routes and the checks every request passes before the ControlApi
// is called. Order of checks: route, method, query string, media type, body; the first failure is
// the answer.
#include "control_router.h"

#include <array>
#include <cctype>
#include <exception>
#include <utility>

#include "json_reply.h"
#include "json_request.h"

namespace kvf::control {
namespace {

struct RouteSpec {
  Route route;
  std::string_view path;
  std::string_view method;
  bool blocking;
};

constexpr std::array<RouteSpec, 9> kRoutes = {{
    {Route::kLookup, "/lookup", "POST", false},
    {Route::kPin, "/pin", "POST", false},
    {Route::kUnpin, "/unpin", "POST", false},
    {Route::kClear, "/clear", "POST", true},
    {Route::kMove, "/move", "POST", true},
    {Route::kCompress, "/compress", "POST", true},
    {Route::kHealth, "/health", "GET", false},
    {Route::kStats, "/stats", "GET", false},
    {Route::kMetrics, "/metrics", "GET", false},
}};

constexpr std::string_view kRouteList =
    "POST /lookup, /pin, /unpin, /clear, /move, /compress; GET /health, /stats, /metrics";

const RouteSpec* spec_of(Route route) {
  for (const auto& spec : kRoutes) {
    if (spec.route == route) return &spec;
  }
  return nullptr;
}

// Client text echoed in a message is cut short: a 16 KiB target is no help in an error.
std::string clip(std::string_view text) {
  constexpr size_t kMax = 128;
  return text.size() <= kMax ? std::string(text) : std::string(text.substr(0, kMax)) + "...";
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  }
  return true;
}

// A missing Content-Type is taken as JSON (quick curl and scripts omit it); any other type is a
// client sending something we would misread.
bool is_json_media_type(std::string_view content_type) {
  std::string_view type = content_type.substr(0, content_type.find(';'));
  while (!type.empty() && (type.front() == ' ' || type.front() == '\t')) type.remove_prefix(1);
  while (!type.empty() && (type.back() == ' ' || type.back() == '\t')) type.remove_suffix(1);
  return type.empty() || iequals(type, "application/json");
}

HttpReply ok_json(std::string body) {
  HttpReply reply;
  reply.body = std::move(body);
  return reply;
}

HttpReply api_error(const Status& status) {
  return error_reply(http_status_of(status.code()), error_code_name(status.code()), status.message());
}

// Decodes, calls, renders: the shape of every POST route.
template <typename Request, typename Decode, typename Call, typename Render>
HttpReply serve(std::string_view body, Decode decode, Call call, Render render) {
  auto request = decode(body);
  if (!request.ok()) {
    const BadRequest& error = request.error();
    return error_reply(error.http_status, error.code, error.message, error.field);
  }
  auto result = call(request.value());
  if (!result.ok()) return api_error(result.status());
  return ok_json(render(request.value(), result.value()));
}

}  // namespace

unsigned http_status_of(ErrorCode code) {
  switch (code) {
    case ErrorCode::kNotFound:
      return 404;
    case ErrorCode::kInvalidArgument:
      return 400;
    case ErrorCode::kUnavailable:
      return 503;
    default:
      return 500;
  }
}

HttpReply error_reply(unsigned status, std::string_view code, std::string_view message,
                      std::string_view field) {
  HttpReply reply;
  reply.status = status;
  reply.body = render_error(code, message, field);
  return reply;
}

ControlRouter::ControlRouter(std::shared_ptr<ControlApi> api, const HttpMetrics* metrics)
    : api_(std::move(api)), metrics_(metrics) {}

Route ControlRouter::route_of(std::string_view target) {
  const std::string_view path = target.substr(0, target.find('?'));
  for (const auto& spec : kRoutes) {
    if (spec.path == path) return spec.route;
  }
  return Route::kNone;
}

bool ControlRouter::runs_blocking(Route route) {
  const RouteSpec* spec = spec_of(route);
  return spec != nullptr && spec->blocking;
}

std::string_view ControlRouter::label(Route route) {
  const RouteSpec* spec = spec_of(route);
  return spec != nullptr ? spec->path : "other";
}

HttpReply ControlRouter::handle(Route route, std::string_view method, std::string_view target,
                                std::string_view content_type, std::string_view body) const {
  try {
    const size_t question = target.find('?');
    const std::string_view path = target.substr(0, question);
    const RouteSpec* spec = spec_of(route);
    if (spec == nullptr) {
      return error_reply(
          404, "unknown_route",
          "no route " + clip(method) + " " + clip(path) + "; routes: " + std::string(kRouteList));
    }
    if (method != spec->method) {
      HttpReply reply = error_reply(405, "method_not_allowed",
                                    clip(method) + " is not allowed on " + std::string(spec->path) +
                                        "; use " + std::string(spec->method));
      reply.allow = std::string(spec->method);
      return reply;
    }
    if (question != std::string_view::npos) {
      return error_reply(400, "unknown_field",
                         "query parameters are not accepted ('" + clip(target.substr(question + 1)) +
                             "'); send fields in the JSON body",
                         "query");
    }
    if (spec->method == "POST" && !is_json_media_type(content_type)) {
      return error_reply(415, "unsupported_media_type",
                         "Content-Type '" + clip(content_type) + "' is not accepted; send application/json",
                         "Content-Type");
    }
    return dispatch(route, body);
  } catch (const std::exception& e) {
    return error_reply(500, "internal", std::string("internal error: ") + e.what());
  } catch (...) {
    return error_reply(500, "internal", "internal error");
  }
}

HttpReply ControlRouter::dispatch(Route route, std::string_view body) const {
  ControlApi& api = *api_;
  switch (route) {
    case Route::kLookup:
      return serve<LookupRequest>(
          body, decode_lookup, [&](const LookupRequest& r) { return api.lookup(r); },
          [](const LookupRequest& r, const LookupResult& result) { return render_lookup(r, result); });
    case Route::kPin:
      return serve<PinRequest>(
          body, decode_pin, [&](const PinRequest& r) { return api.pin(r); },
          [](const PinRequest&, const PinResult& result) { return render_pin(result, true); });
    case Route::kUnpin:
      return serve<PinRequest>(
          body, decode_pin, [&](const PinRequest& r) { return api.unpin(r); },
          [](const PinRequest&, const PinResult& result) { return render_pin(result, false); });
    case Route::kClear:
      return serve<ClearRequest>(
          body, decode_clear, [&](const ClearRequest& r) { return api.clear(r); },
          [](const ClearRequest&, const ClearResult& result) { return render_clear(result); });
    case Route::kMove:
      return serve<MoveRequest>(
          body, decode_move, [&](const MoveRequest& r) { return api.move(r); },
          [](const MoveRequest& r, const MoveResult& result) { return render_move(r, result); });
    case Route::kCompress:
      return serve<CompressRequest>(
          body, decode_compress, [&](const CompressRequest& r) { return api.compress(r); },
          [](const CompressRequest& r, const CompressResult& result) { return render_compress(r, result); });
    case Route::kHealth: {
      const HealthReport report = api.health();
      HttpReply reply = ok_json(render_health(report));
      if (!report.healthy) reply.status = 503;  // load balancers read the status, not the body
      return reply;
    }
    case Route::kStats: {
      auto stats = api.stats();
      if (!stats.ok()) return api_error(stats.status());
      return ok_json(render_stats(stats.value()));
    }
    case Route::kMetrics: {
      auto text = api.metrics();
      if (!text.ok()) return api_error(text.status());
      HttpReply reply;
      reply.content_type = std::string(kPrometheusContentType);
      reply.body = std::move(text.value());
      if (!reply.body.empty() && reply.body.back() != '\n') reply.body += '\n';
      if (metrics_ != nullptr) reply.body += metrics_->render();
      return reply;
    }
    case Route::kNone:
      break;
  }
  return error_reply(500, "internal", "no handler for this route");
}

}  // namespace kvf::control
