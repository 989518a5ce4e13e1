// NodeConnection: one keep-alive HTTP/1.1 connection to one node's kvfabricd, driven by an
// io_context its owner runs. One exchange at a time: start() connects when there is no connection,
// sends the request and reads the reply, all before the deadline (Beast's tcp_stream expiry: its
// blocking calls have no timeouts, so the owner runs these asynchronous ones on its own thread until
// they finish). A reused connection that the daemon has closed meanwhile is reopened and the request
// sent once more. Not thread-safe: the owner serializes calls and runs the io_context.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <optional>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "kvf/protocol/status.h"
#include "kvf/router/router_config.h"

namespace kvf::router {

struct HttpReply {
  unsigned status = 0;
  std::string body;
};

class NodeConnection {
 public:
  using Clock = std::chrono::steady_clock;
  using Done = std::function<void(bool reached, Result<HttpReply>)>;

  // Resolves the endpoint's host now (setup); a failure is reported by every exchange.
  NodeConnection(boost::asio::io_context& io, DaemonEndpoint endpoint, size_t max_reply_bytes);

  // Starts one exchange; `done` runs on the io_context's thread exactly once. `reached` is true when
  // the daemon answered (any HTTP status), false when it could not be connected or did not answer.
  void start(boost::beast::http::verb method, std::string target, std::string body,
             Clock::time_point deadline, Done done);

  const DaemonEndpoint& endpoint() const { return endpoint_; }
  std::string address() const;  // "host:port"

 private:
  void connect();
  void send();
  void on_write(const boost::system::error_code& ec);
  void on_read(const boost::system::error_code& ec);
  void fail(const boost::system::error_code& ec, const char* stage);
  void finish(bool reached, Result<HttpReply> reply);
  void close();

  boost::asio::io_context& io_;
  DaemonEndpoint endpoint_;
  size_t max_reply_bytes_;
  boost::asio::ip::tcp::resolver::results_type addresses_;
  std::string resolve_error_;

  std::optional<boost::beast::tcp_stream> stream_;  // set while connected
  bool reused_ = false;                             // this exchange runs on a connection used before
  bool retried_ = false;
  boost::beast::flat_buffer buffer_;
  boost::beast::http::request<boost::beast::http::string_body> request_;
  std::optional<boost::beast::http::response_parser<boost::beast::http::string_body>> parser_;
  Clock::time_point deadline_;
  Done done_;
};

}  // namespace kvf::router
