// BlockingControlClient: asio connects (with a deadline, over every resolved address); after
// that the socket is driven with poll() + non-blocking send/recv, which lets one thread send while
// another receives and lets close() wake both through shutdown().
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <span>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/address.hpp>

#include "kvf/fabric/control_channel.h"

namespace kvf::fabric {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kReadChunk = 64u << 10;

std::string name_of(const std::string& host, uint16_t port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

// Milliseconds left until `deadline`, rounded up so that a 0.4 ms rest still waits.
int poll_ms_left(Clock::time_point deadline) {
  const auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

}  // namespace

struct BlockingControlClient::Impl {
  asio::io_context io;  // only for connect; the socket needs one for its lifetime
  tcp::socket socket{io};
  int fd = -1;
  std::string remote;
  std::atomic<bool> closed{false};

  std::mutex send_mutex;
  Status send_broken;  // a partial frame went out; the stream cannot be used any more

  std::mutex receive_mutex;
  Status receive_broken;  // peer closed, or sent bytes that do not decode
  std::vector<uint8_t> rx;
  size_t rx_len = 0;

  Status closed_status() const {
    return Status(ErrorCode::kPeerLost, "connection to " + remote + " was closed locally");
  }
};

Result<BlockingControlClient> BlockingControlClient::connect(const std::string& host, uint16_t port,
                                                             std::chrono::milliseconds timeout) {
  const std::string where = name_of(host, port);
  auto impl = std::make_unique<Impl>();
  std::vector<tcp::endpoint> endpoints;
  error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (!ec) {
    endpoints.emplace_back(address, port);
  } else {
    // Name lookup is synchronous and not bounded by `timeout` (getaddrinfo cannot be cancelled);
    // names are expected to come from /etc/hosts or a local resolver.
    tcp::resolver resolver(impl->io);
    const auto results = resolver.resolve(host, std::to_string(port), ec);
    if (ec || results.empty()) {
      return Status(ErrorCode::kPeerLost,
                    "cannot connect to " + where + ": cannot resolve '" + host + "': " + ec.message());
    }
    for (const auto& entry : results) endpoints.push_back(entry.endpoint());
  }

  bool done = false;
  error_code connect_ec;
  asio::async_connect(impl->socket, endpoints, [&](const error_code& result, const tcp::endpoint&) {
    done = true;
    connect_ec = result;
  });
  impl->io.run_for(timeout);
  if (!done) {
    impl->socket.close(ec);
    impl->io.restart();
    impl->io.run();  // lets the aborted connect complete before `done` goes out of scope
    return Status(ErrorCode::kTimeout,
                  "connect to " + where + " timed out after " + std::to_string(timeout.count()) + " ms");
  }
  if (connect_ec) {
    return Status(ErrorCode::kPeerLost, "cannot connect to " + where + ": " + connect_ec.message());
  }
  impl->socket.set_option(tcp::no_delay(true), ec);
  impl->fd = impl->socket.native_handle();
  const auto peer = impl->socket.remote_endpoint(ec);
  impl->remote = ec ? where : endpoint_to_string(peer);
  return BlockingControlClient(std::move(impl));
}

BlockingControlClient::BlockingControlClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BlockingControlClient::BlockingControlClient(BlockingControlClient&&) noexcept = default;
BlockingControlClient& BlockingControlClient::operator=(BlockingControlClient&&) noexcept = default;
BlockingControlClient::~BlockingControlClient() = default;

const std::string& BlockingControlClient::remote() const {
  return impl_->remote;
}

void BlockingControlClient::close() {
  if (!impl_ || impl_->closed.exchange(true)) return;
  // shutdown, not close: another thread may be inside poll() on this descriptor, and closing it
  // there could let the number be reused under it. The descriptor is closed with the object.
  ::shutdown(impl_->fd, SHUT_RDWR);
}

Status BlockingControlClient::send(const protocol::Message& message, std::chrono::milliseconds timeout) {
  Impl& s = *impl_;
  const std::vector<uint8_t> frame = protocol::encode_frame(message);
  const auto deadline = Clock::now() + timeout;
  std::lock_guard lock(s.send_mutex);
  if (s.closed) return s.closed_status();
  if (!s.send_broken.ok()) return s.send_broken;
  size_t sent = 0;
  while (sent < frame.size()) {
    const ssize_t n = ::send(s.fd, frame.data() + sent, frame.size() - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{s.fd, POLLOUT, 0};
      const int ready = ::poll(&p, 1, poll_ms_left(deadline));
      if (ready < 0 && errno != EINTR) {
        s.send_broken = Status(ErrorCode::kInternal, std::string("poll: ") + std::strerror(errno));
        return s.send_broken;
      }
      if (ready == 0) {
        Status timed_out(ErrorCode::kTimeout, "send to " + s.remote + " did not complete within " +
                                                  std::to_string(timeout.count()) + " ms");
        if (sent > 0) {
          // The peer would read the rest of this frame as the start of the next one.
          s.send_broken = timed_out;
          close();
        }
        return timed_out;
      }
      continue;
    }
    if (s.closed) return s.closed_status();
    s.send_broken = Status(ErrorCode::kPeerLost, "send to " + s.remote + " failed: " + std::strerror(errno));
    return s.send_broken;
  }
  return Status::Ok();
}

Result<protocol::Message> BlockingControlClient::receive(std::chrono::milliseconds timeout) {
  Impl& s = *impl_;
  const auto deadline = Clock::now() + timeout;
  std::lock_guard lock(s.receive_mutex);
  if (!s.receive_broken.ok()) return s.receive_broken;
  for (;;) {
    size_t want = protocol::kFrameHeaderBytes;
    std::optional<protocol::FrameHeader> header;
    if (s.rx_len >= protocol::kFrameHeaderBytes) {
      auto decoded = protocol::decode_frame_header(std::span(s.rx.data(), protocol::kFrameHeaderBytes));
      if (!decoded.ok()) {
        s.receive_broken = decoded.status();
        return s.receive_broken;
      }
      header = *decoded;
      want += header->payload_bytes;  // validated: at most kMaxFramePayload
    }
    if (header && s.rx_len >= want) {
      auto message = protocol::decode_payload(
          *header, std::span(s.rx.data() + protocol::kFrameHeaderBytes, header->payload_bytes));
      if (!message.ok()) {
        s.receive_broken = message.status();
        return s.receive_broken;
      }
      // Keep whatever of the next frame already arrived.
      std::memmove(s.rx.data(), s.rx.data() + want, s.rx_len - want);
      s.rx_len -= want;
      if (s.rx.size() > 4 * kReadChunk && s.rx_len <= kReadChunk) {
        s.rx.resize(kReadChunk);
        s.rx.shrink_to_fit();
      }
      return std::move(message).value();
    }
    if (s.closed) return s.closed_status();
    // Before the header is known, read in modest chunks; after, exactly up to the frame's end.
    const size_t target = std::max(want, kReadChunk);
    if (s.rx.size() < target) s.rx.resize(target);
    const ssize_t n = ::recv(s.fd, s.rx.data() + s.rx_len, s.rx.size() - s.rx_len, MSG_DONTWAIT);
    if (n > 0) {
      s.rx_len += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) {
      if (s.closed) return s.closed_status();
      s.receive_broken = Status(ErrorCode::kPeerLost, "connection closed by " + s.remote +
                                                          (s.rx_len > 0 ? " in the middle of a frame" : ""));
      return s.receive_broken;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      if (s.closed) return s.closed_status();
      s.receive_broken =
          Status(ErrorCode::kPeerLost, "receive from " + s.remote + " failed: " + std::strerror(errno));
      return s.receive_broken;
    }
    pollfd p{s.fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, poll_ms_left(deadline));
    if (ready < 0 && errno != EINTR) {
      return Status(ErrorCode::kInternal, std::string("poll: ") + std::strerror(errno));
    }
    if (ready == 0) {
      return Status(ErrorCode::kTimeout,
                    "no message from " + s.remote + " within " + std::to_string(timeout.count()) + " ms");
    }
  }
}

}  // namespace kvf::fabric
