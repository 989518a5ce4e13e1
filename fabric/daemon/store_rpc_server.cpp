// StoreRpcServer: an acceptor on its own strand and one Session per connection on a strand of its
// own. A session reads a header, then the payload (under frame_timeout), runs the request on the
// store (every store call is short: the only long one, commit, hashes one chunk), writes the reply,
// and reads the next. `busy` is true from a complete request until its reply is written: draining
// closes idle sessions at once and busy ones after their reply.
#include "store_rpc_server.h"

#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

#include "kvf/store/store_stats_fields.h"

namespace kvf::daemon {

namespace asio = boost::asio;
namespace rpc = protocol::store_rpc;
using local = asio::local::stream_protocol;
using boost::system::error_code;

namespace {

// Is a live process listening on `path`? Decides whether an existing socket file is stale.
bool someone_listens(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), std::min(path.size(), sizeof addr.sun_path - 1));
  const bool listening = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  return listening;
}

}  // namespace

class Session;

struct RpcServerState : std::enable_shared_from_this<RpcServerState> {
  RpcServerState(store::ChunkStore& s, StoreRpcServerOptions o) : store(s), options(std::move(o)) {}

  store::ChunkStore& store;
  StoreRpcServerOptions options;
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  asio::strand<asio::io_context::executor_type> accept_strand{io.get_executor()};
  local::acceptor acceptor{accept_strand};
  std::vector<std::thread> threads;

  mutable std::mutex mu;
  std::condition_variable all_closed;
  std::map<uint64_t, std::weak_ptr<Session>> sessions;
  bool draining = false;
  bool drained = false;
  uint64_t next_client = 1;

  std::atomic<uint64_t> accepted{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> errors_replied{0};  // requests answered with an error status
  std::atomic<uint64_t> malformed{0};       // frames that did not decode

  void accept_next();
  void session_closed(uint64_t id) {
    std::lock_guard lock(mu);
    sessions.erase(id);
    if (sessions.empty()) all_closed.notify_all();
  }
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Server = RpcServerState;
  Session(std::shared_ptr<Server> server, local::socket socket, uint64_t id)
      : server_(std::move(server)), socket_(std::move(socket)), timer_(socket_.get_executor()), id_(id) {}

  ~Session() { server_->session_closed(id_); }

  void start() {
    asio::post(socket_.get_executor(), [self = shared_from_this()] {
      error_code ec;
      self->socket_.non_blocking(true, ec);  // lets read_ready/write_ready take what is there now
      self->read_header();
    });
  }

  // From any thread: finish the request in hand, then close.
  void drain() {
    asio::post(socket_.get_executor(), [self = shared_from_this()] {
      self->draining_ = true;
      if (!self->busy_) self->close("daemon stopping");
    });
  }
  // From any thread: close now.
  void kill() {
    asio::post(socket_.get_executor(), [self = shared_from_this()] { self->close("daemon stopped"); });
  }

 private:
  // An engine's request usually arrives whole, and its reply fits the socket buffer: taking and
  // giving what is there at once, on this strand, saves a trip through the io_context (and the
  // payload timer) per step; only a frame that is not all there yet waits asynchronously.
  size_t read_ready(uint8_t* p, size_t n) {
    size_t got = 0;
    error_code ec;
    while (got < n) {
      const size_t r = socket_.read_some(asio::buffer(p + got, n - got), ec);
      if (ec) break;  // would_block (wait below) or an error the asynchronous read reports
      got += r;
    }
    return got;
  }
  size_t write_ready(const std::vector<uint8_t>& out) {
    size_t put = 0;
    error_code ec;
    while (put < out.size()) {
      const size_t w = socket_.write_some(asio::buffer(out.data() + put, out.size() - put), ec);
      if (ec) break;
      put += w;
    }
    return put;
  }

  void read_header() {
    // An engine often sends its next request within microseconds of a reply: look again a few
    // times before waiting on epoll, whose wake-up costs tens of microseconds on an idle CPU.
    size_t got = read_ready(header_.data(), header_.size());
    for (int spin = 0; got == 0 && spin < kSpinReads; ++spin)
      got = read_ready(header_.data(), header_.size());
    if (got == header_.size()) return on_header({});
    asio::async_read(socket_, asio::buffer(header_.data() + got, header_.size() - got),
                     [self = shared_from_this()](error_code ec, size_t) {
                       self->inline_depth_ = 0;
                       self->on_header(ec);
                     });
  }

  void on_header(error_code ec) {
    if (ec) return close(ec == asio::error::eof ? "disconnected" : "read: " + ec.message());
    auto header = rpc::decode_header(header_);
    if (!header.ok() && header.status().code() == ErrorCode::kUnsupportedVersion) {
      if (auto refusal = rpc::version_refusal(header_)) return refuse_version(std::move(*refusal));
    }
    if (!header.ok() || header->kind != rpc::FrameKind::kRequest) {
      // The stream is no longer at a frame boundary: nothing after this can be trusted.
      server_->malformed.fetch_add(1, std::memory_order_relaxed);
      return close("bad frame header, closing: " + (header.ok()
                                                        ? std::string("a reply frame sent to the daemon")
                                                        : header.status().to_string()));
    }
    current_ = *header;
    payload_.resize(current_.payload_bytes);
    const size_t got = read_ready(payload_.data(), payload_.size());
    if (got == payload_.size()) return on_payload({});
    // The timer's handler may already be queued when the payload completes: it checks that the
    // frame it was armed for is still being read.
    const uint64_t frame = ++frames_;
    awaiting_payload_ = true;
    timer_.expires_after(server_->options.frame_timeout);
    timer_.async_wait([self = shared_from_this(), frame](error_code tec) {
      if (!tec && self->awaiting_payload_ && self->frames_ == frame) {
        self->close("frame payload did not arrive within the frame timeout");
      }
    });
    asio::async_read(socket_, asio::buffer(payload_.data() + got, payload_.size() - got),
                     [self = shared_from_this()](error_code rec, size_t) {
                       self->inline_depth_ = 0;
                       self->awaiting_payload_ = false;
                       self->timer_.cancel();
                       self->on_payload(rec);
                     });
  }

  // An engine of another store RPC version: tell it so in its own version (it reads the error
  // instead of a bare close), then close; nothing else it sends can be read.
  void refuse_version(rpc::VersionRefusal refusal) {
    server_->malformed.fetch_add(1, std::memory_order_relaxed);
    spdlog::warn("store rpc: client {} speaks store RPC version {}, this daemon version {}: refused, closing",
                 id_, refusal.version, rpc::kVersion);
    busy_ = true;
    out_ = std::move(refusal.reply);
    const size_t put = write_ready(out_);
    if (put == out_.size()) return close("refused: store rpc version " + std::to_string(refusal.version));
    asio::async_write(socket_, asio::buffer(out_.data() + put, out_.size() - put),
                      [self = shared_from_this(), v = refusal.version](error_code, size_t) {
                        self->close("refused: store rpc version " + std::to_string(v));
                      });
  }

  void on_payload(error_code ec) {
    if (ec) return close(ec == asio::error::eof ? "disconnected mid-frame" : "read: " + ec.message());
    busy_ = true;
    server_->requests.fetch_add(1, std::memory_order_relaxed);
    rpc::Reply reply;
    reply.op = current_.op;
    reply.id = current_.request_id;
    auto request = rpc::decode_request(current_, payload_);
    if (!request.ok()) {
      server_->malformed.fetch_add(1, std::memory_order_relaxed);
      spdlog::warn("store rpc: client {} ({}): {}", id_, name_, request.status().to_string());
      reply.status = request.status();
    } else {
      handle(*request, reply);
    }
    if (!reply.status.ok()) {
      server_->errors_replied.fetch_add(1, std::memory_order_relaxed);
      reply.body = rpc::EmptyReply{};
    }
    out_ = rpc::encode_reply(reply);
    const size_t put = write_ready(out_);
    if (put == out_.size()) {
      busy_ = false;
      if (draining_) return close("daemon stopping");
      // A client that pipelines could keep this recursing: every so often, go round the io_context.
      if (++inline_depth_ < kMaxInlineDepth) return read_header();
      inline_depth_ = 0;
      asio::post(socket_.get_executor(), [self = shared_from_this()] { self->read_header(); });
      return;
    }
    asio::async_write(socket_, asio::buffer(out_.data() + put, out_.size() - put),
                      [self = shared_from_this()](error_code wec, size_t) {
                        self->inline_depth_ = 0;
                        self->busy_ = false;
                        if (wec) return self->close("write: " + wec.message());
                        if (self->draining_) return self->close("daemon stopping");
                        self->read_header();
                      });
  }

  void handle(const rpc::Request& request, rpc::Reply& reply) {
    store::ChunkStore& store = server_->store;
    if (request.op != rpc::Op::kHello && !hello_) {
      reply.status =
          Status(ErrorCode::kInvalidArgument, "say hello first (the reply names the arena to map)");
      return;
    }
    switch (request.op) {
      case rpc::Op::kHello: {
        name_ = std::get<rpc::HelloRequest>(request.body).client_name;
        hello_ = true;
        rpc::HelloReply hello = server_->options.arena;
        hello.node = server_->options.node;
        hello.client_id = id_;
        reply.body = hello;
        spdlog::info("store rpc: client {} connected: '{}'", id_, name_);
        return;
      }
      case rpc::Op::kReserve: {
        const auto& m = std::get<rpc::ReserveRequest>(request.body);
        auto r = store.reserve(m.key, m.bytes, id_, m.model, m.codec);
        if (!r.ok()) {
          reply.status = r.status();
          return;
        }
        reservations_.insert(r->id);
        reply.body = rpc::ReserveReply{r->id, r->offset, r->length};
        return;
      }
      case rpc::Op::kCommit:
      case rpc::Op::kAbort: {
        const auto& m = std::get<rpc::CommitRequest>(request.body);
        if (reservations_.count(m.reservation_id) == 0) {
          reply.status = Status(ErrorCode::kNotFound, "reservation " + std::to_string(m.reservation_id) +
                                                          " was not made on this connection");
          return;
        }
        reply.status = request.op == rpc::Op::kCommit ? store.commit(m.key, m.reservation_id)
                                                      : store.abort(m.key, m.reservation_id);
        // Done either way, except a commit refused because one is already running (cannot happen on
        // one connection) or because the key does not match (the reservation is still there).
        if (reply.status.ok() || reply.status.code() == ErrorCode::kNotFound)
          reservations_.erase(m.reservation_id);
        reply.body = rpc::EmptyReply{};
        return;
      }
      case rpc::Op::kLookup: {
        const auto& m = std::get<rpc::LookupRequest>(request.body);
        reply.body = rpc::LookupReply{static_cast<uint32_t>(store.lookup(m.keys))};
        return;
      }
      case rpc::Op::kAcquire: {
        auto l = store.acquire(std::get<rpc::KeyRequest>(request.body).key, id_);
        if (!l.ok()) {
          reply.status = l.status();
          return;
        }
        leases_.insert(l->id);
        reply.body = rpc::AcquireReply{l->id, l->offset, l->length, l->checksum, l->codec};
        return;
      }
      case rpc::Op::kRelease: {
        const uint64_t lease = std::get<rpc::ReleaseRequest>(request.body).lease_id;
        if (leases_.erase(lease) == 0) {
          reply.status =
              Status(ErrorCode::kNotFound,
                     "lease " + std::to_string(lease) + " was not granted on this connection or is released");
          return;
        }
        reply.status = store.release(lease);
        reply.body = rpc::EmptyReply{};
        return;
      }
      case rpc::Op::kPin:
        reply.status = store.pin(std::get<rpc::KeyRequest>(request.body).key);
        reply.body = rpc::EmptyReply{};
        return;
      case rpc::Op::kUnpin:
        reply.status = store.unpin(std::get<rpc::KeyRequest>(request.body).key);
        reply.body = rpc::EmptyReply{};
        return;
      case rpc::Op::kClear: {
        const auto& m = std::get<rpc::ClearRequest>(request.body);
        const store::ClearResult r = m.scope == rpc::ClearScope::kAll     ? store.clear_all()
                                     : m.scope == rpc::ClearScope::kModel ? store.clear_model(m.model)
                                                                          : store.clear(m.keys);
        reply.body = rpc::ClearReply{r.removed, r.deferred, r.bytes};
        return;
      }
      case rpc::Op::kStats:
        reply.body = rpc::StatsReply{store::store_stats_to_pairs(store.stats())};
        return;
    }
    reply.status = Status(ErrorCode::kMalformed, "unknown op");
  }

  void close(const std::string& why) {
    if (closed_) return;
    closed_ = true;
    timer_.cancel();
    error_code ignored;
    socket_.shutdown(local::socket::shutdown_both, ignored);
    socket_.close(ignored);
    const store::ReapResult freed = server_->store.drop_client(id_);
    if (freed.reservations > 0 || freed.leases > 0) {
      spdlog::info("store rpc: client {} ('{}') {}: freed {} reservation(s) and {} lease(s) it held", id_,
                   name_, why, freed.reservations, freed.leases);
    } else if (why.rfind("bad frame", 0) == 0 || why.rfind("frame payload", 0) == 0) {
      spdlog::warn("store rpc: client {} ('{}'): {}", id_, name_, why);
    } else {
      spdlog::debug("store rpc: client {} ('{}') {}", id_, name_, why);
    }
  }

  std::shared_ptr<Server> server_;
  local::socket socket_;
  asio::steady_timer timer_;
  uint64_t id_;
  std::string name_;
  bool hello_ = false;
  bool busy_ = false;
  bool draining_ = false;
  bool closed_ = false;
  bool awaiting_payload_ = false;
  uint64_t frames_ = 0;
  std::array<uint8_t, rpc::kHeaderBytes> header_{};
  static constexpr int kMaxInlineDepth = 16;
  static constexpr int kSpinReads = 100;
  int inline_depth_ = 0;  // requests served back to back without returning to the io_context
  rpc::FrameHeader current_{};
  std::vector<uint8_t> payload_;
  std::vector<uint8_t> out_;
  // This connection's holds, so that one engine cannot commit or release another's.
  std::unordered_set<uint64_t> reservations_;
  std::unordered_set<uint64_t> leases_;
};

void RpcServerState::accept_next() {
  acceptor.async_accept(asio::make_strand(io),
                        [self = shared_from_this()](error_code ec, local::socket socket) {
                          if (ec) {
                            if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) return;
                            spdlog::warn("store rpc: accept: {}", ec.message());
                            return self->accept_next();
                          }
                          std::shared_ptr<Session> session;
                          {
                            std::lock_guard lock(self->mu);
                            if (self->draining) return;  // the socket closes as it goes out of scope
                            const uint64_t id = self->next_client++;
                            session = std::make_shared<Session>(self, std::move(socket), id);
                            self->sessions.emplace(id, session);
                          }
                          self->accepted.fetch_add(1, std::memory_order_relaxed);
                          session->start();
                          self->accept_next();
                        });
}

StoreRpcServer::StoreRpcServer(std::shared_ptr<RpcServerState> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<StoreRpcServer>> StoreRpcServer::start(store::ChunkStore& store,
                                                              StoreRpcServerOptions options) {
  const std::string path = options.socket_path;
  if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    return Status(ErrorCode::kInvalidArgument, "store socket path '" + path + "' is empty or longer than " +
                                                   std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) +
                                                   " bytes");
  }
  if (options.io_threads == 0)
    return Status(ErrorCode::kInvalidArgument, "store rpc: io_threads must be >= 1");
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status(ErrorCode::kInvalidArgument, "store socket path " + path + " exists and is not a socket");
    }
    if (someone_listens(path)) {
      return Status(
          ErrorCode::kInvalidArgument,
          "store socket " + path + " is served by a running process (another kvfabricd for this node?)");
    }
    spdlog::info("store rpc: removing stale socket {} (nothing listens on it)", path);
    unlink(path.c_str());
  }
  auto impl = std::make_shared<RpcServerState>(store, std::move(options));
  error_code ec;
  impl->acceptor.open(local(), ec);
  if (!ec) impl->acceptor.bind(local::endpoint(path), ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status(ErrorCode::kInvalidArgument, "store socket " + path + ": " + ec.message());
  impl->work.emplace(impl->io.get_executor());
  asio::post(impl->accept_strand, [raw = impl.get()] { raw->accept_next(); });
  for (size_t i = 0; i < impl->options.io_threads; ++i) {
    impl->threads.emplace_back([raw = impl.get(), i] {
      const std::string name = "kvfd-rpc-" + std::to_string(i);
      pthread_setname_np(pthread_self(), name.c_str());
      raw->io.run();
    });
  }
  return std::unique_ptr<StoreRpcServer>(new StoreRpcServer(std::move(impl)));
}

void StoreRpcServer::drain(std::chrono::milliseconds grace) {
  RpcServerState& m = *impl_;
  std::vector<std::shared_ptr<Session>> live;
  {
    std::lock_guard lock(m.mu);
    if (m.drained) return;
    m.drained = true;
    m.draining = true;
    for (auto& [id, weak] : m.sessions) {
      if (auto s = weak.lock()) live.push_back(std::move(s));
    }
  }
  // Stop accepting first, so no engine connects to a daemon that is going away.
  std::promise<void> closed;
  asio::post(m.accept_strand, [&m, &closed] {
    error_code ignored;
    m.acceptor.close(ignored);
    closed.set_value();
  });
  closed.get_future().wait();
  unlink(m.options.socket_path.c_str());
  spdlog::info("store rpc: stopped accepting, removed {}; finishing {} connection(s)", m.options.socket_path,
               live.size());
  for (auto& s : live) s->drain();
  live.clear();
  {
    std::unique_lock lock(m.mu);
    if (!m.all_closed.wait_for(lock, grace, [&m] { return m.sessions.empty(); })) {
      spdlog::warn("store rpc: {} connection(s) still busy after {} ms; closing them", m.sessions.size(),
                   grace.count());
      for (auto& [id, weak] : m.sessions) {
        if (auto s = weak.lock()) live.push_back(std::move(s));
      }
    }
  }
  for (auto& s : live) s->kill();
  live.clear();
  // Every socket is closed or closing now: the io threads run out of work and return.
  m.work.reset();
  for (auto& t : m.threads) {
    if (t.joinable()) t.join();
  }
  m.threads.clear();
}

StoreRpcServer::~StoreRpcServer() {
  drain(std::chrono::milliseconds(0));
}

std::string StoreRpcServer::metrics() const {
  const RpcServerState& m = *impl_;
  size_t open = 0;
  {
    std::lock_guard lock(m.mu);
    open = m.sessions.size();
  }
  auto line = [](const char* name, const char* type, const char* help, uint64_t v) {
    return std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
           std::to_string(v) + "\n";
  };
  return line("kvf_store_rpc_connections", "gauge", "Engine connections open on the store socket.", open) +
         line("kvf_store_rpc_connections_total", "counter", "Engine connections accepted.",
              m.accepted.load(std::memory_order_relaxed)) +
         line("kvf_store_rpc_requests_total", "counter", "Store RPC requests served.",
              m.requests.load(std::memory_order_relaxed)) +
         line("kvf_store_rpc_error_replies_total", "counter", "Store RPC requests answered with an error.",
              m.errors_replied.load(std::memory_order_relaxed)) +
         line("kvf_store_rpc_malformed_total", "counter", "Store RPC frames that did not decode.",
              m.malformed.load(std::memory_order_relaxed));
}

}  // namespace kvf::daemon
