// The control channel: framed protocol::Message exchange over TCP (Boost.Asio) between daemons,
// tools and engines. Asynchronous side: ControlContext + ControlServer + ControlConnection, whose
// handlers run on the context's io thread. Synchronous side: BlockingControlClient for tools.
// Thread rules are stated above each class.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include "kvf/protocol/messages.h"
#include "kvf/protocol/status.h"

namespace kvf::fabric {

// Timeouts of one connection. 0 turns a timeout off.
struct ControlOptions {
  // Once the first byte of a frame has arrived, the whole frame must arrive within this time,
  // else the connection closes with kTimeout (a stalled or hostile peer cannot pin a buffer).
  std::chrono::milliseconds read_timeout{10'000};
  // Time allowed between frames; off by default because control connections idle for hours.
  std::chrono::milliseconds idle_timeout{0};
  // One queued batch of frames must be written within this time (a peer that stops reading is
  // dropped rather than growing our queue forever); also bounds the flush on close().
  std::chrono::milliseconds write_timeout{10'000};
};

class ControlConnection;

// Owns an io_context and the one thread that runs it; everything asynchronous in this header runs
// its handlers there. Destruction stops the context and joins the thread, destroying pending
// handlers: close connections (or let them end) before destroying it. io() is safe from any thread.
class ControlContext {
 public:
  ControlContext();
  ~ControlContext();
  ControlContext(const ControlContext&) = delete;
  ControlContext& operator=(const ControlContext&) = delete;

  boost::asio::io_context& io() { return io_; }
  // Stops and joins the io thread; the io_context lives on (posts to it are dropped, not run), so
  // owners can stop handlers first and then tear down what the handlers use. Idempotent.
  void stop();
  bool in_io_thread() const { return std::this_thread::get_id() == thread_.get_id(); }
  // An owner's shutdown before stop(), which drops frames not yet written: closes each connection
  // (each flushes what it queued, bounded by its write timeout) and waits up to `timeout` in all
  // until every one has ended. On the io thread it only closes (waiting there would wait on
  // itself). Returns the connections that had not ended.
  std::vector<std::shared_ptr<ControlConnection>> close_and_wait(
      const std::vector<std::shared_ptr<ControlConnection>>& connections, const Status& reason,
      std::chrono::milliseconds timeout);

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread thread_;
};

// One framed, asynchronous TCP connection. send() and close() are safe from any thread; the
// handlers given to start() run on the io thread, one at a time. on_close runs exactly once, after
// which no on_message runs. Malformed input from the peer is answered with a best-effort
// ErrorReply and closes the connection; it never reaches on_message. Like every asio object it
// must not outlive its io_context: drop your references before the ControlContext goes.
class ControlConnection : public std::enable_shared_from_this<ControlConnection> {
 public:
  using MessageHandler = std::function<void(const protocol::Message&)>;
  using CloseHandler = std::function<void(const Status&)>;

  // Takes over a connected socket (from an acceptor or a connect the caller made).
  static std::shared_ptr<ControlConnection> adopt(boost::asio::ip::tcp::socket socket,
                                                  ControlOptions options = {});

  ControlConnection(const ControlConnection&) = delete;
  ControlConnection& operator=(const ControlConnection&) = delete;
  ~ControlConnection();

  // Starts the read loop; only the first call counts. If the connection already ended, on_close
  // runs (on the io thread) with the reason it ended.
  void start(MessageHandler on_message, CloseHandler on_close);
  // Encodes on the caller's thread, then queues; frames go out in the order send() was called
  // (per calling thread). Dropped once the connection is closing.
  void send(const protocol::Message& message);
  // Stops reading, flushes what was queued before (bounded by write_timeout), closes the socket and
  // reports `reason` to on_close. Idempotent; the first reason to end the connection wins.
  void close(Status reason);
  // Blocks until the connection has ended (after close(): its queued frames written or given up
  // on, the socket closed, on_close returned), or until `timeout`; true if it ended. Never from
  // the io thread, which would wait on itself (ControlContext::close_and_wait does both steps).
  bool wait_closed(std::chrono::milliseconds timeout);
  // "127.0.0.1:40312" / "[::1]:40312"; fixed at construction.
  const std::string& remote() const { return remote_; }
  // Bytes queued but not yet written; lets a producer apply back-pressure.
  size_t queued_bytes() const { return queued_bytes_.load(std::memory_order_relaxed); }

 private:
  enum class State { kOpen, kClosing, kClosed };
  using Strand = boost::asio::strand<boost::asio::any_io_executor>;
  struct Private {};  // keeps the constructor for make_shared only

 public:
  ControlConnection(Private, boost::asio::ip::tcp::socket socket, ControlOptions options);

 private:
  // All of these run on strand_.
  void do_start(MessageHandler on_message, CloseHandler on_close);
  void read_header();
  void on_header_bytes(const boost::system::error_code& ec, size_t n);
  void on_payload(const boost::system::error_code& ec);
  void on_read_error(const boost::system::error_code& ec);
  void reject(Status reason);  // best-effort ErrorReply, then close
  void enqueue(std::vector<uint8_t> frame);
  void write_next();
  void begin_close(Status reason);
  void finish(Status reason);
  void arm_read_timer(std::chrono::milliseconds after, Status on_expiry);
  void disarm_read_timer();
  void arm_write_timer(std::chrono::milliseconds after);
  void disarm_write_timer();

  const ControlOptions options_;
  boost::asio::ip::tcp::socket socket_;
  Strand strand_;
  boost::asio::steady_timer read_timer_;
  boost::asio::steady_timer write_timer_;
  uint64_t read_timer_gen_ = 0;  // a timer that fired after being re-armed must not act
  uint64_t write_timer_gen_ = 0;
  std::string remote_;

  State state_ = State::kOpen;
  bool started_ = false;
  Status close_reason_;
  MessageHandler on_message_;
  CloseHandler on_close_;

  std::array<uint8_t, protocol::kFrameHeaderBytes> header_bytes_{};
  size_t header_have_ = 0;
  protocol::FrameHeader header_;
  std::vector<uint8_t> payload_;

  std::deque<std::vector<uint8_t>> queue_;
  std::vector<std::vector<uint8_t>> inflight_;
  bool writing_ = false;
  std::atomic<size_t> queued_bytes_{0};

  // Set once finish() is done; the only state read off the strand (by wait_closed).
  std::mutex ended_mutex_;
  std::condition_variable ended_cv_;
  bool ended_ = false;
};

// Listens on host:port and hands each accepted connection to on_accept (on the io thread), which
// must call start() on it. Keeps accepting after errors on single connections or accepts. stop()
// is safe from any thread and closes the listening socket at once; accepted connections live on.
// Destroy the server before its io_context.
class ControlServer {
 public:
  using AcceptHandler = std::function<void(std::shared_ptr<ControlConnection>)>;

  // port 0 picks an ephemeral port (see port()). host may be an address or a name.
  static Result<std::unique_ptr<ControlServer>> listen(boost::asio::io_context& io, const std::string& host,
                                                       uint16_t port, AcceptHandler on_accept,
                                                       ControlOptions options = {});
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  uint16_t port() const { return port_; }
  void stop();

 private:
  struct State;  // shared with pending accept handlers, which may outlive this object
  ControlServer(std::shared_ptr<State> state, uint16_t port) : state_(std::move(state)), port_(port) {}
  std::shared_ptr<State> state_;
  uint16_t port_;
};

// Synchronous client for tools and tests. Every call is bounded by its timeout. send() and
// receive() may run on two different threads at once (one sender, one receiver); close() may be
// called from any thread and wakes both. Move-only.
class BlockingControlClient {
 public:
  static Result<BlockingControlClient> connect(const std::string& host, uint16_t port,
                                               std::chrono::milliseconds timeout);
  BlockingControlClient(BlockingControlClient&&) noexcept;
  BlockingControlClient& operator=(BlockingControlClient&&) noexcept;
  ~BlockingControlClient();

  // A send that times out part-way leaves the stream unusable, so it closes the client.
  Status send(const protocol::Message& message,
              std::chrono::milliseconds timeout = std::chrono::milliseconds(10'000));
  // Returns the next message; an ErrorReply from the peer is returned as a message. A timeout
  // keeps any partial frame, so receive() can be called again.
  Result<protocol::Message> receive(std::chrono::milliseconds timeout);
  void close();
  const std::string& remote() const;

 private:
  struct Impl;
  explicit BlockingControlClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// "127.0.0.1:7000", "[::1]:7000", "localhost:7000" -> (host, port). IPv6 needs brackets.
Result<std::pair<std::string, uint16_t>> parse_host_port(std::string_view text);

// "127.0.0.1:7000" or "[::1]:7000" for an endpoint.
std::string endpoint_to_string(const boost::asio::ip::tcp::endpoint& endpoint);

}  // namespace kvf::fabric
