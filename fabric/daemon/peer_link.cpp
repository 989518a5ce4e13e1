#include "peer_link.h"

#include <array>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>
#include <boost/asio.hpp>

namespace kvf::daemon {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

std::array<uint8_t, 4> length_prefix(size_t n) {
  return {static_cast<uint8_t>(n), static_cast<uint8_t>(n >> 8), static_cast<uint8_t>(n >> 16),
          static_cast<uint8_t>(n >> 24)};
}
uint32_t read_prefix(const std::array<uint8_t, 4>& b) {
  return uint32_t{b[0]} | uint32_t{b[1]} << 8 | uint32_t{b[2]} << 16 | uint32_t{b[3]} << 24;
}

ErrorCode code_named(const std::string& name) {
  for (uint16_t c = 0; c <= static_cast<uint16_t>(ErrorCode::kUnavailable); ++c) {
    if (error_code_name(static_cast<ErrorCode>(c)) == name) return static_cast<ErrorCode>(c);
  }
  return ErrorCode::kInternal;
}

// One peer's connection: read a frame, answer it, until the peer closes.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const PeerHandler& handler) : socket_(std::move(socket)), handler_(handler) {}
  void start() { read_header(); }

 private:
  void read_header() {
    asio::async_read(socket_, asio::buffer(header_), [self = shared_from_this()](auto ec, size_t) {
      if (ec) return;  // closed or reset: nothing to answer
      const uint32_t n = read_prefix(self->header_);
      if (n == 0 || n > kMaxPeerFrameBytes) {
        self->reply_and_close(
            peer_error(Status(ErrorCode::kMalformed, "peer frame of " + std::to_string(n) + " bytes (1.." +
                                                         std::to_string(kMaxPeerFrameBytes) + ")")));
        return;
      }
      self->body_.resize(n);
      self->read_body();
    });
  }
  void read_body() {
    asio::async_read(socket_, asio::buffer(body_), [self = shared_from_this()](auto ec, size_t) {
      if (ec) return;
      nlohmann::json request = nlohmann::json::parse(self->body_, nullptr, /*allow_exceptions=*/false);
      if (request.is_discarded() || !request.is_object() || !request.contains("op") ||
          !request["op"].is_string()) {
        self->reply_and_close(peer_error(
            Status(ErrorCode::kMalformed, "peer frame is not a JSON object with a string \"op\"")));
        return;
      }
      nlohmann::json reply;
      try {
        reply = self->handler_(request);
      } catch (const std::exception& e) {  // a handler's bug must not take the daemon down
        reply = peer_error(Status(ErrorCode::kInternal, std::string("peer request failed: ") + e.what()));
      }
      self->write(std::move(reply), /*then_close=*/false);
    });
  }
  void reply_and_close(nlohmann::json reply) { write(std::move(reply), true); }
  void write(nlohmann::json reply, bool then_close) {
    out_ = reply.dump();
    prefix_ = length_prefix(out_.size());
    std::array<asio::const_buffer, 2> buffers{asio::buffer(prefix_), asio::buffer(out_)};
    asio::async_write(socket_, buffers, [self = shared_from_this(), then_close](auto ec, size_t) {
      if (ec || then_close) {
        boost::system::error_code ignored;
        self->socket_.close(ignored);
        return;
      }
      self->read_header();
    });
  }

  tcp::socket socket_;
  const PeerHandler& handler_;
  std::array<uint8_t, 4> header_{};
  std::string body_;
  std::array<uint8_t, 4> prefix_{};
  std::string out_;
};

}  // namespace

class PeerServer::Impl {
 public:
  Impl(PeerHandler handler) : handler_(std::move(handler)), acceptor_(io_) {}
  ~Impl() {
    io_.stop();
    for (auto& t : threads_) t.join();
  }

  Status bind(const std::string& host, uint16_t port) {
    boost::system::error_code ec;
    const auto address = asio::ip::make_address(host, ec);
    if (ec) return Status(ErrorCode::kInvalidArgument, "peer address '" + host + "': " + ec.message());
    tcp::endpoint endpoint(address, port);
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return Status(ErrorCode::kUnavailable,
                    "peer service on " + host + ":" + std::to_string(port) + ": " + ec.message());
    }
    port_ = acceptor_.local_endpoint().port();
    return Status::Ok();
  }
  void run(size_t threads) {
    accept();
    for (size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  uint16_t port() const { return port_; }

 private:
  void accept() {
    acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        socket.set_option(tcp::no_delay(true), ec);
        std::make_shared<Session>(std::move(socket), handler_)->start();
      }
      accept();
    });
  }

  PeerHandler handler_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::vector<std::thread> threads_;
  uint16_t port_ = 0;
};

Result<std::unique_ptr<PeerServer>> PeerServer::start(const std::string& host, uint16_t port,
                                                      PeerHandler handler, size_t threads) {
  auto impl = std::make_unique<Impl>(std::move(handler));
  if (Status s = impl->bind(host, port); !s.ok()) return s;
  impl->run(std::max<size_t>(threads, 1));
  return std::unique_ptr<PeerServer>(new PeerServer(std::move(impl)));
}

PeerServer::PeerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PeerServer::~PeerServer() = default;
uint16_t PeerServer::port() const {
  return impl_->port();
}

nlohmann::json peer_error(const Status& status) {
  return {{"error", status.message()}, {"code", std::string(error_code_name(status.code()))}};
}

Result<nlohmann::json> peer_request(const std::string& host, uint16_t port, const nlohmann::json& request,
                                    std::chrono::milliseconds deadline) {
  const std::string where = host + ":" + std::to_string(port);
  asio::io_context io;
  tcp::socket socket(io);
  tcp::resolver resolver(io);
  boost::system::error_code failure;
  bool finished = false;
  const std::string out = request.dump();
  const auto prefix = length_prefix(out.size());
  std::array<uint8_t, 4> header{};
  std::string body;

  auto fail = [&](boost::system::error_code ec) {
    failure = ec;
    finished = true;
  };
  resolver.async_resolve(host, std::to_string(port), [&](auto ec, tcp::resolver::results_type results) {
    if (ec) return fail(ec);
    asio::async_connect(socket, results, [&](auto ec2, const tcp::endpoint&) {
      if (ec2) return fail(ec2);
      socket.set_option(tcp::no_delay(true), ec2);
      std::array<asio::const_buffer, 2> buffers{asio::buffer(prefix), asio::buffer(out)};
      asio::async_write(socket, buffers, [&](auto ec3, size_t) {
        if (ec3) return fail(ec3);
        asio::async_read(socket, asio::buffer(header), [&](auto ec4, size_t) {
          if (ec4) return fail(ec4);
          const uint32_t n = read_prefix(header);
          if (n == 0 || n > kMaxPeerFrameBytes) return fail(asio::error::message_size);
          body.resize(n);
          asio::async_read(socket, asio::buffer(body), [&](auto ec5, size_t) { fail(ec5); });
        });
      });
    });
  });
  io.run_for(deadline);
  if (!finished) {
    return Status(ErrorCode::kTimeout, "peer " + where + " did not answer '" + request.value("op", "") +
                                           "' within " + std::to_string(deadline.count()) + " ms");
  }
  if (failure) {
    return Status(ErrorCode::kUnavailable, "peer " + where + ": " + failure.message());
  }
  nlohmann::json reply = nlohmann::json::parse(body, nullptr, false);
  if (reply.is_discarded() || !reply.is_object()) {
    return Status(ErrorCode::kMalformed,
                  "peer " + where + " answered with something that is not a JSON object");
  }
  if (auto e = reply.find("error"); e != reply.end()) {
    const std::string code = reply.value("code", "internal");
    return Status(code_named(code),
                  "peer " + where + ": " + (e->is_string() ? e->get<std::string>() : e->dump()));
  }
  return reply;
}

}  // namespace kvf::daemon
