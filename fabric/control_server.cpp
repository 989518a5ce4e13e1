// ControlServer: the accept loop. Its state is shared with the pending accept handler so that
// destroying the server while an accept is outstanding is safe; a mutex serialises the acceptor
// between stop() (any thread) and the loop (io thread).
#include <exception>

#include <spdlog/spdlog.h>
#include <boost/asio/ip/address.hpp>

#include "kvf/fabric/control_channel.h"

namespace kvf::fabric {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

struct ControlServer::State : std::enable_shared_from_this<ControlServer::State> {
  State(asio::io_context& io, AcceptHandler handler, ControlOptions opts, std::string where)
      : acceptor(io), retry_timer(io), on_accept(std::move(handler)), options(opts), name(std::move(where)) {}

  void accept_next() {
    std::lock_guard lock(mutex);
    if (stopped) return;
    acceptor.async_accept([self = shared_from_this()](const error_code& ec, tcp::socket socket) {
      self->on_accepted(ec, std::move(socket));
    });
  }

  void on_accepted(const error_code& ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;  // stop()
    if (ec) {
      // Out of descriptors, a connection reset before accept, ...: keep serving, but pause a
      // little so that a persistent error does not spin the io thread.
      spdlog::warn("control server {}: accept failed: {}", name, ec.message());
      std::lock_guard lock(mutex);
      if (stopped) return;
      retry_timer.expires_after(std::chrono::milliseconds(50));
      retry_timer.async_wait([self = shared_from_this()](const error_code& wait_ec) {
        if (!wait_ec) self->accept_next();
      });
      return;
    }
    auto connection = ControlConnection::adopt(std::move(socket), options);
    try {
      on_accept(std::move(connection));
    } catch (const std::exception& e) {
      spdlog::error("control server {}: accept handler threw: {}", name, e.what());
    }
    accept_next();
  }

  std::mutex mutex;
  bool stopped = false;
  tcp::acceptor acceptor;
  asio::steady_timer retry_timer;
  AcceptHandler on_accept;
  ControlOptions options;
  std::string name;  // "host:port" for logs
};

Result<std::unique_ptr<ControlServer>> ControlServer::listen(asio::io_context& io, const std::string& host,
                                                             uint16_t port, AcceptHandler on_accept,
                                                             ControlOptions options) {
  const std::string where =
      (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
  if (!on_accept)
    return Status(ErrorCode::kInvalidArgument, "control server " + where + ": no accept handler");

  error_code ec;
  tcp::endpoint endpoint;
  const auto address = asio::ip::make_address(host, ec);
  if (!ec) {
    endpoint = tcp::endpoint(address, port);
  } else {
    tcp::resolver resolver(io);
    const auto results = resolver.resolve(host, std::to_string(port), tcp::resolver::passive, ec);
    if (ec || results.empty()) {
      return Status(ErrorCode::kInvalidArgument,
                    "cannot listen on " + where + ": cannot resolve '" + host + "': " + ec.message());
    }
    endpoint = results.begin()->endpoint();
  }

  auto state = std::make_shared<State>(io, std::move(on_accept), options, where);
  auto fail = [&](const char* step) {
    return Status(ErrorCode::kTransportError,
                  "cannot listen on " + where + ": " + step + ": " + ec.message());
  };
  state->acceptor.open(endpoint.protocol(), ec);
  if (ec) return fail("socket");
  // Lets a restarted daemon rebind while old connections sit in TIME_WAIT.
  state->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (ec) return fail("SO_REUSEADDR");
  state->acceptor.bind(endpoint, ec);
  if (ec) return fail("bind");
  state->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return fail("listen");
  const auto local = state->acceptor.local_endpoint(ec);
  if (ec) return fail("local address");
  state->name = endpoint_to_string(local);
  state->accept_next();
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(state), local.port()));
}

ControlServer::~ControlServer() {
  stop();
}

void ControlServer::stop() {
  std::lock_guard lock(state_->mutex);
  if (state_->stopped) return;
  state_->stopped = true;
  error_code ignored;
  state_->acceptor.close(ignored);
  state_->retry_timer.cancel();
}

}  // namespace kvf::fabric
