// HttpControlServer: the HTTP/JSON front end of a ControlApi for operators and routers (Boost.Beast,
// HTTP/1.1 with keep-alive). Routes: POST /lookup /pin /unpin /clear /move /compress, GET /health
// /stats /metrics. Every request body is validated strictly before the ControlApi sees it; any bad
// input gets a 4xx with {"error", "field", "code"} and the server keeps serving.
// Thread rules: start() and stop() may be called from any thread (stop() not from a handler); the
// ControlApi is called from the server's io threads and its blocking pool, concurrently.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kvf/control/control_api.h"
#include "kvf/protocol/status.h"

namespace kvf::control {

struct HttpServerOptions {
  std::string host = "127.0.0.1";  // an address or a name
  uint16_t port = 0;               // 0: an ephemeral port, see HttpControlServer::port()
  // Threads that parse, validate, run the fast operations (lookup, pin, unpin, health, stats,
  // metrics) and write replies.
  size_t io_threads = 1;
  // Threads for the operations that may take long (move, compress, clear), so that a slow move
  // never holds up lookups or a Prometheus scrape.
  size_t blocking_threads = 2;
  size_t max_body_bytes = 1 << 20;     // larger bodies get 413
  size_t max_header_bytes = 16 << 10;  // larger request heads get 431
  // A keep-alive connection may sit idle this long before the next request's head must be in.
  std::chrono::milliseconds idle_timeout{60'000};
  // Once the head is in, the body must arrive within this time (a trickling client cannot hold a
  // connection and its buffer for long).
  std::chrono::milliseconds body_timeout{10'000};
  // A reply must be written within this time, else the connection is dropped.
  std::chrono::milliseconds write_timeout{10'000};
};

// Listens until stop() or destruction; each connection is served in order (HTTP/1.1 pipelining
// is answered one request at a time). Destruction stops accepting, closes open connections, waits
// for running operations to return and joins every thread.
class HttpControlServer {
 public:
  static Result<std::unique_ptr<HttpControlServer>> start(std::shared_ptr<ControlApi> api,
                                                          HttpServerOptions options = {});
  ~HttpControlServer();
  HttpControlServer(const HttpControlServer&) = delete;
  HttpControlServer& operator=(const HttpControlServer&) = delete;

  uint16_t port() const;
  // "127.0.0.1:8080"
  const std::string& address() const;
  // Idempotent; returns once every thread has stopped.
  void stop();

 private:
  struct Impl;
  explicit HttpControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::control
