// HttpControlServer: an acceptor and one Session per connection, all on the server's io_context.
// Each session runs on its own strand (or on the one io thread) and reads one request at a time:
// head first (so that an oversized Content-Length is refused before the body is read, and
// "Expect: 100-continue" is answered), then the body. A request that cannot be parsed gets a reply
// and the connection is closed, because the byte stream can no longer be trusted to be at a
// message boundary; a request that parses but is invalid gets a 4xx and the connection stays open.
#include "kvf/control/http_server.h"

#include <pthread.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include "control_router.h"
#include "http_metrics.h"
#include "kvf/fabric/control_channel.h"
#include "kvf/fabric/version.h"

namespace kvf::control {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using boost::system::error_code;

namespace {

class Session;

// Beast's string views are boost::string_view in 1.74 and boost::core::string_view from 1.81.
template <typename View>
std::string_view sv(const View& view) {
  return std::string_view(view.data(), view.size());
}

// What sessions share with the server. Sessions hold it by shared_ptr, so it outlives every
// handler the io_context still holds when the server goes.
struct ServerState {
  ServerState(std::shared_ptr<ControlApi> api, HttpServerOptions opts)
      : options(std::move(opts)), router(std::move(api), &metrics) {}

  void add(Session* session, const std::shared_ptr<Session>& shared) {
    std::lock_guard lock(sessions_mutex);
    sessions.emplace(session, shared);
  }
  void remove(Session* session) {
    std::lock_guard lock(sessions_mutex);
    sessions.erase(session);
  }

  const HttpServerOptions options;
  HttpMetrics metrics;
  const ControlRouter router;
  std::optional<asio::thread_pool> blocking;  // null after stop() joined it
  std::atomic<bool> stopping{false};
  std::mutex sessions_mutex;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;
  std::string server_header = "kvfabricd/" + std::string(fabric::version());
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, std::shared_ptr<ServerState> state)
      : stream_(std::move(socket)), state_(std::move(state)), options_(state_->options) {
    state_->metrics.connection_opened();
  }
  ~Session() {
    state_->metrics.connection_closed();
    state_->remove(this);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void start() {
    state_->add(this, shared_from_this());
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->read_head(); });
  }

  // From any thread: ends the connection at once (server shutdown); `done` runs on the session's
  // executor once the socket is closed.
  void abort(std::function<void()> done) {
    asio::post(stream_.get_executor(), [self = shared_from_this(), done = std::move(done)] {
      error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
      self->stream_.close();
      done();
    });
  }
  // Only while no io thread runs (after the server joined them).
  void close_now() {
    error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

 private:
  void read_head() {
    if (state_->stopping.load()) return close();
    parser_.emplace();
    parser_->body_limit(options_.max_body_bytes);
    parser_->header_limit(static_cast<uint32_t>(options_.max_header_bytes));
    stream_.expires_after(options_.idle_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = shared_from_this()](const error_code& ec, size_t) { self->on_head(ec); });
  }

  void on_head(const error_code& ec) {
    if (ec) return on_read_error(ec);
    const auto& head = parser_->get();
    if (head.version() >= 11 && beast::iequals(head[http::field::expect], "100-continue")) {
      // The client waits for this before sending the body (curl does for large bodies).
      continue_.emplace(http::status::continue_, head.version());
      stream_.expires_after(options_.write_timeout);
      http::async_write(stream_, *continue_, [self = shared_from_this()](const error_code& write_ec, size_t) {
        self->continue_.reset();
        if (write_ec) return self->close();
        self->read_body();
      });
      return;
    }
    read_body();
  }

  void read_body() {
    if (parser_->is_done()) return on_request();
    stream_.expires_after(options_.body_timeout);
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](const error_code& ec, size_t) {
      if (ec) return self->on_read_error(ec);
      self->on_request();
    });
  }

  void on_request() {
    stream_.expires_never();
    request_ = parser_->release();
    parser_.reset();
    keep_alive_ = request_.keep_alive();
    route_ = ControlRouter::route_of(sv(request_.target()));
    if (ControlRouter::runs_blocking(route_) && request_.method() == http::verb::post) {
      if (state_->stopping.load()) return close();
      // Run the operation on the blocking pool; the reply comes back on this session's executor.
      asio::post(*state_->blocking, [self = shared_from_this()] {
        HttpReply reply = self->route_request();
        asio::post(self->stream_.get_executor(),
                   [self, reply = std::move(reply)]() mutable { self->send(std::move(reply), false); });
      });
      return;
    }
    send(route_request(), false);
  }

  HttpReply route_request() const {
    return state_->router.handle(route_, sv(request_.method_string()), sv(request_.target()),
                                 sv(request_[http::field::content_type]), request_.body());
  }

  // Beast reports problems with the bytes as errors in its own category; anything else is the
  // socket or our timer.
  void on_read_error(const error_code& ec) {
    if (ec == http::error::end_of_stream || ec == http::error::partial_message) return close();
    if (ec == beast::error::timeout) return close();  // idle keep-alive, or a stalled client
    if (ec == http::error::body_limit) {
      return send(error_reply(413, "body_too_large",
                              "request body is larger than the limit of " +
                                  std::to_string(options_.max_body_bytes) + " bytes"),
                  true);
    }
    if (ec == http::error::header_limit) {
      return send(error_reply(431, "headers_too_large",
                              "request head is larger than the limit of " +
                                  std::to_string(options_.max_header_bytes) + " bytes"),
                  true);
    }
    if (ec.category() == http::make_error_code(http::error::bad_method).category()) {
      return send(error_reply(400, "malformed_http", "malformed HTTP request: " + ec.message()), true);
    }
    close();  // reset by peer, closed, ...: nobody to answer
  }

  void send(HttpReply reply, bool close_after) {
    state_->metrics.record(close_after ? "other" : ControlRouter::label(route_), reply.status);
    close_after_write_ = close_after || !keep_alive_;
    response_ = {};
    response_.version(request_.version() == 10 ? 10 : 11);
    response_.result(reply.status);
    response_.set(http::field::server, state_->server_header);
    response_.set(http::field::content_type, reply.content_type);
    if (!reply.allow.empty()) response_.set(http::field::allow, reply.allow);
    response_.body() = std::move(reply.body);
    response_.keep_alive(!close_after_write_);
    response_.prepare_payload();
    stream_.expires_after(options_.write_timeout);
    http::async_write(stream_, response_, [self = shared_from_this()](const error_code& ec, size_t) {
      if (ec) return self->close();
      if (self->close_after_write_) return self->linger_close();
      self->request_ = {};
      self->read_head();
    });
  }

  // After an error reply on a connection we close, the client may still be sending the request we
  // refused. Closing with unread bytes makes the kernel send a reset, which can destroy our reply
  // before the client reads it; so stop sending, read and drop what comes for a short while, then
  // close.
  void linger_close() {
    error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(std::chrono::seconds(1));
    drain();
  }

  void drain() {
    constexpr size_t kMaxDrainBytes = 64 << 20;
    if (drained_ >= kMaxDrainBytes) return close();
    stream_.async_read_some(asio::buffer(drain_buffer_),
                            [self = shared_from_this()](const error_code& ec, size_t n) {
                              if (ec) return self->close();
                              self->drained_ += n;
                              self->drain();
                            });
  }

  void close() {
    error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  std::shared_ptr<ServerState> state_;
  const HttpServerOptions& options_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::optional<http::response<http::empty_body>> continue_;
  http::request<http::string_body> request_;
  http::response<http::string_body> response_;
  Route route_ = Route::kNone;
  bool keep_alive_ = false;
  bool close_after_write_ = false;
  std::array<char, 16 << 10> drain_buffer_{};
  size_t drained_ = 0;
};

}  // namespace

struct HttpControlServer::Impl {
  std::shared_ptr<ServerState> state;
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  asio::strand<asio::io_context::executor_type> accept_strand{io.get_executor()};
  tcp::acceptor acceptor{accept_strand};
  asio::steady_timer retry_timer{accept_strand};
  std::vector<std::thread> threads;
  std::string address;
  uint16_t port = 0;
  std::mutex stop_mutex;
  bool stopped = false;

  void accept_next() {
    // A connection's handlers must never run concurrently. With one io thread that holds by itself;
    // with more, each connection gets a strand (which, when not needed, cost about a third of the
    // lookup throughput in kvfabric-http-bench).
    const asio::any_io_executor executor =
        state->options.io_threads > 1 ? asio::any_io_executor(asio::make_strand(io)) : io.get_executor();
    acceptor.async_accept(executor, [this](const error_code& ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted || state->stopping.load()) return;
      if (ec) {
        // Out of descriptors and the like: keep serving, but pause so a lasting error does not
        // spin an io thread.
        spdlog::warn("http control server {}: accept failed: {}", address, ec.message());
        retry_timer.expires_after(std::chrono::milliseconds(50));
        retry_timer.async_wait([this](const error_code& wait_ec) {
          if (!wait_ec && !state->stopping.load()) accept_next();
        });
        return;
      }
      error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);  // replies are small and latency-bound
      std::make_shared<Session>(std::move(socket), state)->start();
      accept_next();
    });
  }

  void run_thread(size_t index) {
    const std::string name = "kvf-http-" + std::to_string(index);
    pthread_setname_np(pthread_self(), name.c_str());
    // A throwing handler must not end the process: log it and keep serving other connections.
    for (;;) {
      try {
        io.run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("http control server {}: handler threw: {}", address, e.what());
      } catch (...) {
        spdlog::error("http control server {}: handler threw a non-std exception", address);
      }
    }
  }
};

Result<std::unique_ptr<HttpControlServer>> HttpControlServer::start(std::shared_ptr<ControlApi> api,
                                                                    HttpServerOptions options) {
  const std::string where =
      (options.host.find(':') != std::string::npos ? "[" + options.host + "]" : options.host) + ":" +
      std::to_string(options.port);
  if (!api) return Status(ErrorCode::kInvalidArgument, "http control server " + where + ": no ControlApi");
  if (options.io_threads == 0 || options.blocking_threads == 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "http control server " + where + ": io_threads and blocking_threads must be at least 1");
  }
  if (options.max_body_bytes == 0 || options.max_header_bytes == 0 || options.max_header_bytes > UINT32_MAX) {
    return Status(ErrorCode::kInvalidArgument, "http control server " + where + ": bad body or header limit");
  }

  auto impl = std::make_unique<Impl>();
  impl->state = std::make_shared<ServerState>(std::move(api), options);

  error_code ec;
  tcp::endpoint endpoint;
  const auto address = asio::ip::make_address(options.host, ec);
  if (!ec) {
    endpoint = tcp::endpoint(address, options.port);
  } else {
    tcp::resolver resolver(impl->io);
    const auto results =
        resolver.resolve(options.host, std::to_string(options.port), tcp::resolver::passive, ec);
    if (ec || results.empty()) {
      return Status(ErrorCode::kInvalidArgument,
                    "cannot listen on " + where + ": cannot resolve '" + options.host + "': " + ec.message());
    }
    endpoint = results.begin()->endpoint();
  }
  auto fail = [&](const char* step) {
    return Status(ErrorCode::kTransportError,
                  "cannot listen on " + where + ": " + step + ": " + ec.message());
  };
  impl->acceptor.open(endpoint.protocol(), ec);
  if (ec) return fail("socket");
  // Lets a restarted daemon rebind while old connections sit in TIME_WAIT.
  impl->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (ec) return fail("SO_REUSEADDR");
  impl->acceptor.bind(endpoint, ec);
  if (ec) return fail("bind");
  impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return fail("listen");
  const auto local = impl->acceptor.local_endpoint(ec);
  if (ec) return fail("local address");
  impl->port = local.port();
  impl->address = fabric::endpoint_to_string(local);

  impl->state->blocking.emplace(options.blocking_threads);
  impl->work.emplace(impl->io.get_executor());
  Impl* raw = impl.get();
  asio::post(impl->accept_strand, [raw] { raw->accept_next(); });
  for (size_t i = 0; i < options.io_threads; ++i)
    impl->threads.emplace_back([raw, i] { raw->run_thread(i); });
  spdlog::info("http control server listening on {}", impl->address);
  return std::unique_ptr<HttpControlServer>(new HttpControlServer(std::move(impl)));
}

HttpControlServer::HttpControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpControlServer::~HttpControlServer() {
  stop();
}

uint16_t HttpControlServer::port() const {
  return impl_->port;
}

const std::string& HttpControlServer::address() const {
  return impl_->address;
}

void HttpControlServer::stop() {
  std::lock_guard lock(impl_->stop_mutex);
  if (impl_->stopped) return;
  impl_->stopped = true;
  ServerState& state = *impl_->state;
  state.stopping.store(true);

  std::vector<std::shared_ptr<Session>> open;
  {
    std::lock_guard sessions_lock(state.sessions_mutex);
    for (auto& [ptr, weak] : state.sessions) {
      if (auto session = weak.lock()) open.push_back(std::move(session));
    }
  }
  // Sockets are closed on their own executors (asio objects are not thread-safe), and the io threads
  // keep running until that is done: stopping them first would leave clients connected to a server
  // that no longer answers.
  struct Latch {
    std::mutex mutex;
    std::condition_variable cv;
    size_t pending = 0;
  };
  auto latch = std::make_shared<Latch>();
  latch->pending = open.size() + 1;
  auto count_down = [latch] {
    std::lock_guard latch_lock(latch->mutex);
    if (--latch->pending == 0) latch->cv.notify_all();
  };
  Impl* raw = impl_.get();
  asio::post(impl_->accept_strand, [raw, count_down] {
    error_code ignored;
    raw->acceptor.close(ignored);
    raw->retry_timer.cancel();
    count_down();
  });
  for (auto& session : open) session->abort(count_down);
  open.clear();
  {
    std::unique_lock latch_lock(latch->mutex);
    // Bounded: an io thread stuck in a ControlApi call must not hang shutdown forever.
    if (!latch->cv.wait_for(latch_lock, std::chrono::seconds(10), [&] { return latch->pending == 0; })) {
      spdlog::warn("http control server {}: connections did not close within 10 s; stopping anyway",
                   impl_->address);
    }
  }
  impl_->work.reset();
  impl_->io.stop();
  for (auto& thread : impl_->threads) {
    if (thread.joinable()) thread.join();
  }
  // A connection accepted while the latch was counting down is closed here, from this thread,
  // which is safe now that no io thread runs.
  {
    std::lock_guard sessions_lock(state.sessions_mutex);
    for (auto& [ptr, weak] : state.sessions) {
      if (auto session = weak.lock()) open.push_back(std::move(session));
    }
  }
  for (auto& session : open) session->close_now();
  open.clear();
  // No session code runs now. Operations already running on the blocking pool finish (the
  // ControlApi must not be torn down under them); queued ones are dropped with their sessions.
  state.blocking->stop();
  state.blocking->join();
  state.blocking.reset();
  impl_->threads.clear();
}

}  // namespace kvf::control
