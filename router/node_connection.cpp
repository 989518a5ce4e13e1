#include "node_connection.h"

#include <exception>
#include <utility>

#include <boost/asio/connect.hpp>
#include <boost/asio/error.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>

namespace kvf::router {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

NodeConnection::NodeConnection(asio::io_context& io, DaemonEndpoint endpoint, size_t max_reply_bytes)
    : io_(io), endpoint_(std::move(endpoint)), max_reply_bytes_(max_reply_bytes) {
  boost::system::error_code ec;
  tcp::resolver resolver(io_);
  addresses_ = resolver.resolve(endpoint_.host, std::to_string(endpoint_.port), ec);
  if (ec) resolve_error_ = "cannot resolve '" + endpoint_.host + "': " + ec.message();
}

std::string NodeConnection::address() const {
  return endpoint_.host + ":" + std::to_string(endpoint_.port);
}

void NodeConnection::start(http::verb method, std::string target, std::string body,
                           Clock::time_point deadline, Done done) {
  done_ = std::move(done);
  deadline_ = deadline;
  retried_ = false;
  if (!resolve_error_.empty()) {
    // Through the io_context, so that `done` never runs inside start().
    asio::post(io_, [this] { finish(false, Status(ErrorCode::kPeerLost, resolve_error_)); });
    return;
  }
  request_ = {};
  request_.method(method);
  request_.target(target);
  request_.version(11);
  request_.set(http::field::host, address());
  request_.set(http::field::user_agent, "kvfabric-router");
  request_.keep_alive(true);
  if (method == http::verb::post) {
    request_.set(http::field::content_type, "application/json");
    request_.body() = std::move(body);
  }
  request_.prepare_payload();
  if (stream_) {
    reused_ = true;
    send();
  } else {
    connect();
  }
}

void NodeConnection::connect() {
  reused_ = false;
  stream_.emplace(io_);
  stream_->expires_at(deadline_);
  stream_->async_connect(addresses_, [this](const boost::system::error_code& ec, const tcp::endpoint&) {
    if (ec) return fail(ec, "connect");
    stream_->socket().set_option(tcp::no_delay(true));
    send();
  });
}

void NodeConnection::send() {
  buffer_.clear();
  parser_.emplace();
  parser_->body_limit(max_reply_bytes_);
  parser_->header_limit(64 * 1024);
  stream_->expires_at(deadline_);
  http::async_write(*stream_, request_,
                    [this](const boost::system::error_code& ec, size_t) { on_write(ec); });
}

void NodeConnection::on_write(const boost::system::error_code& ec) {
  if (ec) return fail(ec, "send");
  stream_->expires_at(deadline_);
  http::async_read(*stream_, buffer_, *parser_,
                   [this](const boost::system::error_code& read_ec, size_t) { on_read(read_ec); });
}

void NodeConnection::on_read(const boost::system::error_code& ec) {
  if (ec) return fail(ec, "read the reply");
  auto& response = parser_->get();
  HttpReply reply;
  reply.status = response.result_int();
  reply.body = std::move(response.body());
  if (!parser_->keep_alive()) close();
  finish(true, std::move(reply));
}

void NodeConnection::fail(const boost::system::error_code& ec, const char* stage) {
  close();
  const bool timed_out = ec == beast::error::timeout;
  // A keep-alive connection the daemon closed while idle fails on first use with one of these: open
  // a fresh one and send again, once. (Our requests are safe to repeat: lookups read, and pin, unpin
  // and clear leave the same state when applied twice.)
  const bool stale = ec == http::error::end_of_stream || ec == asio::error::eof ||
                     ec == asio::error::connection_reset || ec == asio::error::broken_pipe;
  if (reused_ && stale && !retried_ && Clock::now() < deadline_) {
    retried_ = true;
    connect();
    return;
  }
  if (timed_out) {
    finish(false, Status(ErrorCode::kTimeout, std::string("no answer in time (") + stage + ")"));
  } else if (ec == http::error::body_limit) {
    finish(true,
           Status(ErrorCode::kMalformed, "reply longer than " + std::to_string(max_reply_bytes_) + " bytes"));
  } else {
    finish(false, Status(ErrorCode::kPeerLost, std::string(stage) + ": " + ec.message()));
  }
}

void NodeConnection::finish(bool reached, Result<HttpReply> reply) {
  Done done = std::move(done_);
  done_ = nullptr;
  if (done) done(reached, std::move(reply));
}

void NodeConnection::close() {
  if (!stream_) return;
  boost::system::error_code ignored;
  stream_->socket().shutdown(tcp::socket::shutdown_both, ignored);
  stream_->socket().close(ignored);
  stream_.reset();
}

}  // namespace kvf::router
