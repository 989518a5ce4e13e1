// ControlRouter: one HTTP request (method, target, content type, body) in, one reply out. Finds
// the route, checks method and media type, decodes and validates the body, calls the ControlApi and
// renders its result or maps its error to a status code. Knows nothing of sockets, so the server's
// I/O and the API's semantics stay apart. Thread-safe: handle() may run on many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "http_metrics.h"
#include "kvf/control/control_api.h"
#include "kvf/protocol/status.h"

namespace kvf::control {

enum class Route : uint8_t {
  kLookup,
  kPin,
  kUnpin,
  kClear,
  kMove,
  kCompress,
  kHealth,
  kStats,
  kMetrics,
  kNone
};

struct HttpReply {
  unsigned status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::string allow;  // the Allow header of a 405
};

inline constexpr std::string_view kPrometheusContentType = "text/plain; version=0.0.4; charset=utf-8";

// kNotFound 404, kInvalidArgument 400, kUnavailable 503, anything else 500.
unsigned http_status_of(ErrorCode code);

class ControlRouter {
 public:
  // metrics: the server's own counters, appended to the API's on GET /metrics; must outlive this.
  ControlRouter(std::shared_ptr<ControlApi> api, const HttpMetrics* metrics);

  // The route of a request target's path (the part before '?'); kNone when none matches.
  static Route route_of(std::string_view target);
  // Operations that may run long (move, compress, clear) go to the server's blocking pool.
  static bool runs_blocking(Route route);
  // The metrics label of a route: its path, or "other".
  static std::string_view label(Route route);

  // Never throws: an exception from the API or the JSON library becomes a 500.
  HttpReply handle(Route route, std::string_view method, std::string_view target,
                   std::string_view content_type, std::string_view body) const;

 private:
  HttpReply dispatch(Route route, std::string_view body) const;
  std::shared_ptr<ControlApi> api_;
  const HttpMetrics* metrics_;
};

HttpReply error_reply(unsigned status, std::string_view code, std::string_view message,
                      std::string_view field = {});

}  // namespace kvf::control
