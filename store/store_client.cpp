#include "kvf/store/store_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <utility>

#include "kvf/protocol/store_rpc.h"
#include "kvf/store/shared_arena.h"
#include "kvf/store/store_stats_fields.h"

namespace kvf::store {

namespace rpc = protocol::store_rpc;
using Clock = std::chrono::steady_clock;

namespace {

std::string errno_text(int err) {
  return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

int ms_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return left > 60'000 ? 60'000 : static_cast<int>(left);
}

// How a call ended when it did not get its reply; decides whether it may be sent again.
enum class Failure : uint8_t {
  kNone,
  kClosedBeforeReply,  // the daemon closed (or was gone) before any reply byte: it did not run it
  kOther,
};

}  // namespace

struct StoreClient::Impl {
  // Non-blocking recv attempts before a reply wait sleeps in poll (a few microseconds of spinning).
  static constexpr int kSpinReads = 200;
  explicit Impl(StoreClientOptions o) : options(std::move(o)) {}

  StoreClientOptions options;
  mutable std::mutex mu;
  int fd = -1;
  uint64_t connection = 0;  // increases with every connection made
  uint64_t next_request = 1;
  std::string node;
  std::unique_ptr<SharedArena> arena;
  std::vector<std::unique_ptr<SharedArena>> retired;  // arenas of earlier daemons, still mapped

  bool is_connected() const { return fd >= 0; }

  void disconnect() {
    if (fd >= 0) close(fd);
    fd = -1;
  }

  Status wait_for(short events, Clock::time_point deadline, const char* what) {
    for (;;) {
      pollfd p{fd, events, 0};
      const int n = poll(&p, 1, ms_left(deadline));
      if (n > 0) return Status::Ok();
      if (n == 0) {
        return Status(ErrorCode::kTimeout, std::string("store daemon at ") + options.socket_path + ": no " +
                                               what + " within " +
                                               std::to_string(options.call_timeout.count()) + " ms");
      }
      if (errno != EINTR) return Status(ErrorCode::kPeerLost, std::string("poll: ") + errno_text(errno));
    }
  }

  Status write_all(std::span<const uint8_t> data, Clock::time_point deadline, Failure& failure) {
    size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (Status s = wait_for(POLLOUT, deadline, "room to send"); !s.ok()) return s;
        continue;
      }
      const int err = errno;
      if (err == EPIPE || err == ECONNRESET) failure = Failure::kClosedBeforeReply;
      return Status(ErrorCode::kPeerLost,
                    "store daemon at " + options.socket_path + " closed the connection: " + errno_text(err));
    }
    return Status::Ok();
  }

  // `first` tells whether these are the first bytes of the reply (an EOF there means not run).
  Status read_exact(uint8_t* out, size_t size, Clock::time_point deadline, bool first, Failure& failure) {
    size_t done = 0;
    int spun = 0;
    while (done < size) {
      const ssize_t n = recv(fd, out + done, size - done, 0);
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        // A reply usually comes within microseconds: ask again for a short while before sleeping
        // in poll, whose wake-up alone costs tens of microseconds on an idle (virtual) CPU.
        if (spun < kSpinReads) {
          ++spun;
          continue;
        }
        if (Status s = wait_for(POLLIN, deadline, "reply"); !s.ok()) return s;
        continue;
      }
      const int err = n == 0 ? 0 : errno;
      if (first && done == 0 && (n == 0 || err == ECONNRESET)) failure = Failure::kClosedBeforeReply;
      return Status(ErrorCode::kPeerLost, "store daemon at " + options.socket_path +
                                              " closed the connection" +
                                              (n == 0 ? std::string() : ": " + errno_text(err)));
    }
    return Status::Ok();
  }

  // One request and its reply on the current connection. On any failure the connection is closed
  // (its stream is no longer in a known state).
  Result<rpc::Reply> exchange(rpc::Op op, rpc::RequestBody body, Clock::time_point deadline,
                              Failure& failure) {
    failure = Failure::kOther;
    const uint64_t id = next_request++;
    const std::vector<uint8_t> frame = rpc::encode_request(rpc::Request{op, id, std::move(body)});
    auto fail = [&](Status s) -> Result<rpc::Reply> {
      disconnect();
      return s;
    };
    Failure io = Failure::kOther;
    if (Status s = write_all(frame, deadline, io); !s.ok()) {
      failure = io;
      return fail(s);
    }
    uint8_t header_bytes[rpc::kHeaderBytes];
    if (Status s = read_exact(header_bytes, sizeof header_bytes, deadline, true, io); !s.ok()) {
      failure = io;
      return fail(s);
    }
    auto header = rpc::decode_header(header_bytes);
    if (!header.ok()) {
      if (header.status().code() == ErrorCode::kUnsupportedVersion) {
        return fail(Status(ErrorCode::kUnsupportedVersion,
                           "store daemon at " + options.socket_path +
                               " answered in another store RPC version: " + header.status().message() +
                               " (engines and kvfabricd must come from the same kvfabric release)"));
      }
      return fail(header.status());
    }
    if (header->kind != rpc::FrameKind::kReply || header->request_id != id || header->op != op) {
      return fail(Status(ErrorCode::kMalformed, "store daemon answered request " + std::to_string(id) + " (" +
                                                    std::string(rpc::op_name(op)) +
                                                    ") with a frame for request " +
                                                    std::to_string(header->request_id) + " (" +
                                                    std::string(rpc::op_name(header->op)) + ")"));
    }
    std::vector<uint8_t> payload(header->payload_bytes);
    if (Status s = read_exact(payload.data(), payload.size(), deadline, false, io); !s.ok()) return fail(s);
    auto reply = rpc::decode_reply(*header, payload);
    if (!reply.ok()) return fail(reply.status());
    failure = Failure::kNone;
    return reply;
  }

  Status connect_locked() {
    if (is_connected()) return Status::Ok();
    const auto deadline = Clock::now() + options.connect_timeout;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (options.socket_path.empty() || options.socket_path.size() >= sizeof addr.sun_path) {
      return Status(ErrorCode::kInvalidArgument, "store socket path '" + options.socket_path +
                                                     "' is empty or longer than " +
                                                     std::to_string(sizeof addr.sun_path - 1) + " bytes");
    }
    std::memcpy(addr.sun_path, options.socket_path.data(), options.socket_path.size());
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status(ErrorCode::kInternal, "socket: " + errno_text(errno));
    // A Unix socket connects at once or fails at once (EAGAIN: the daemon's backlog is full).
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      const int err = errno;
      disconnect();
      return Status(ErrorCode::kUnavailable,
                    "store daemon not reachable at " + options.socket_path + ": " + errno_text(err) +
                        (err == ENOENT || err == ECONNREFUSED ? " (is kvfabricd running?)" : ""));
    }
    Failure failure = Failure::kNone;
    auto reply = exchange(rpc::Op::kHello, rpc::HelloRequest{options.client_name}, deadline, failure);
    if (!reply.ok()) {
      Status s = reply.status();
      if (s.code() == ErrorCode::kPeerLost) {
        // Accepted by the kernel, closed by the daemon before it said hello: it is stopping.
        return Status(
            ErrorCode::kUnavailable,
            "store daemon at " + options.socket_path +
                " closed the connection during hello (stopping? or a kvfabricd older than store RPC "
                "version " +
                std::to_string(rpc::kVersion) + ", which closes on newer frames: see its log)");
      }
      return s;
    }
    if (!reply->status.ok()) {
      disconnect();
      return reply->status;
    }
    const auto& hello = std::get<rpc::HelloReply>(reply->body);
    if (!arena || arena->name() != hello.arena_name || arena->size() != hello.arena_bytes ||
        arena->backing() != hello.backing) {
      auto mapped = SharedArena::open(hello.backing, hello.arena_name, hello.arena_bytes);
      if (!mapped.ok()) {
        disconnect();
        return mapped.status();
      }
      if (arena) retired.push_back(std::move(arena));
      arena = std::make_unique<SharedArena>(std::move(mapped.value()));
    }
    node = hello.node;
    ++connection;
    return Status::Ok();
  }

  // Connects when needed, sends, waits for the reply. A request that a daemon closed on before
  // answering (it was restarted since the last call) is sent once more on a new connection, unless
  // it refers to the old connection's reservations or leases.
  Result<rpc::Reply> call(rpc::Op op, const rpc::RequestBody& body) {
    const bool bound_to_connection =
        op == rpc::Op::kCommit || op == rpc::Op::kAbort || op == rpc::Op::kRelease;
    for (int attempt = 0;; ++attempt) {
      const bool reused = is_connected();
      if (Status s = connect_locked(); !s.ok()) return s;
      Failure failure = Failure::kNone;
      auto reply = exchange(op, body, Clock::now() + options.call_timeout, failure);
      if (reply.ok()) {
        if (!reply->status.ok()) return reply->status;
        if (!rpc::reply_body_matches(op, reply->body)) {
          disconnect();
          return Status(ErrorCode::kMalformed,
                        "store daemon's " + std::string(rpc::op_name(op)) + " reply has the wrong shape");
        }
        return reply;
      }
      if (attempt == 0 && reused && failure == Failure::kClosedBeforeReply && !bound_to_connection) continue;
      return reply.status();
    }
  }

  Status stale(uint64_t made_on, std::string_view what) const {
    if (made_on == connection && is_connected()) return Status::Ok();
    return Status(ErrorCode::kPeerLost, std::string(what) +
                                            " was made on an earlier connection to the store daemon, which "
                                            "freed it when that connection ended");
  }
};

StoreClient::StoreClient(StoreClientOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

StoreClient::~StoreClient() {
  std::lock_guard lock(impl_->mu);
  impl_->disconnect();
}

Status StoreClient::connect() {
  std::lock_guard lock(impl_->mu);
  return impl_->connect_locked();
}

bool StoreClient::connected() const {
  std::lock_guard lock(impl_->mu);
  return impl_->is_connected();
}

std::string StoreClient::node() const {
  std::lock_guard lock(impl_->mu);
  return impl_->node;
}

uint64_t StoreClient::arena_bytes() const {
  std::lock_guard lock(impl_->mu);
  return impl_->arena ? impl_->arena->size() : 0;
}

std::span<uint8_t> StoreClient::arena() const {
  std::lock_guard lock(impl_->mu);
  if (!impl_->arena) return {};
  return {impl_->arena->data(), static_cast<size_t>(impl_->arena->size())};
}

Result<ClientReservation> StoreClient::reserve(const protocol::ChunkKey& key, uint64_t bytes,
                                               const protocol::ChunkKey& model, protocol::KvCodec codec) {
  std::lock_guard lock(impl_->mu);
  auto reply = impl_->call(rpc::Op::kReserve, rpc::ReserveRequest{key, bytes, model, codec});
  if (!reply.ok()) return reply.status();
  const auto& r = std::get<rpc::ReserveReply>(reply->body);
  if (r.length != bytes || r.offset > impl_->arena->size() || r.length > impl_->arena->size() - r.offset) {
    impl_->disconnect();
    return Status(ErrorCode::kMalformed, "store daemon reserved [" + std::to_string(r.offset) + ", +" +
                                             std::to_string(r.length) + ") for " + std::to_string(bytes) +
                                             " bytes in an arena of " + std::to_string(impl_->arena->size()));
  }
  return ClientReservation{Reservation{key, r.reservation_id, r.offset, r.length}, impl_->connection};
}

std::span<uint8_t> StoreClient::bytes(const ClientReservation& r) const {
  std::lock_guard lock(impl_->mu);
  if (!impl_->stale(r.connection, "reservation").ok()) return {};
  return {impl_->arena->data() + r.reservation.offset, static_cast<size_t>(r.reservation.length)};
}

Status StoreClient::commit(const ClientReservation& r) {
  std::lock_guard lock(impl_->mu);
  if (Status s = impl_->stale(r.connection, "reservation " + std::to_string(r.reservation.id)); !s.ok())
    return s;
  return impl_->call(rpc::Op::kCommit, rpc::CommitRequest{r.reservation.key, r.reservation.id}).status();
}

Status StoreClient::abort(const ClientReservation& r) {
  std::lock_guard lock(impl_->mu);
  if (Status s = impl_->stale(r.connection, "reservation " + std::to_string(r.reservation.id)); !s.ok())
    return s;
  return impl_->call(rpc::Op::kAbort, rpc::CommitRequest{r.reservation.key, r.reservation.id}).status();
}

Status StoreClient::put(const protocol::ChunkKey& key, std::span<const uint8_t> data,
                        const protocol::ChunkKey& model, protocol::KvCodec codec) {
  auto r = reserve(key, data.size(), model, codec);
  if (!r.ok()) return r.status();
  std::span<uint8_t> dst = bytes(*r);
  if (dst.size() != data.size()) {
    return Status(ErrorCode::kPeerLost, "store daemon connection ended between reserve and write");
  }
  std::memcpy(dst.data(), data.data(), data.size());
  return commit(*r);
}

Result<size_t> StoreClient::lookup(std::span<const protocol::ChunkKey> keys) {
  if (keys.size() > rpc::kMaxKeys) {
    return Status(ErrorCode::kInvalidArgument, "lookup of " + std::to_string(keys.size()) +
                                                   " keys (at most " + std::to_string(rpc::kMaxKeys) +
                                                   " per call)");
  }
  std::lock_guard lock(impl_->mu);
  auto reply = impl_->call(rpc::Op::kLookup, rpc::LookupRequest{{keys.begin(), keys.end()}});
  if (!reply.ok()) return reply.status();
  return static_cast<size_t>(std::get<rpc::LookupReply>(reply->body).matched);
}

Result<ClientLease> StoreClient::acquire(const protocol::ChunkKey& key) {
  std::lock_guard lock(impl_->mu);
  auto reply = impl_->call(rpc::Op::kAcquire, rpc::KeyRequest{key});
  if (!reply.ok()) return reply.status();
  const auto& a = std::get<rpc::AcquireReply>(reply->body);
  if (a.offset > impl_->arena->size() || a.length > impl_->arena->size() - a.offset) {
    impl_->disconnect();
    return Status(ErrorCode::kMalformed, "store daemon leased [" + std::to_string(a.offset) + ", +" +
                                             std::to_string(a.length) + ") outside an arena of " +
                                             std::to_string(impl_->arena->size()));
  }
  return ClientLease{Lease{a.lease_id, key, a.offset, a.length, a.checksum, {}, a.codec}, impl_->connection};
}

std::span<const uint8_t> StoreClient::bytes(const ClientLease& l) const {
  std::lock_guard lock(impl_->mu);
  if (!impl_->stale(l.connection, "lease").ok()) return {};
  return {impl_->arena->data() + l.lease.offset, static_cast<size_t>(l.lease.length)};
}

Status StoreClient::release(const ClientLease& l) {
  std::lock_guard lock(impl_->mu);
  if (Status s = impl_->stale(l.connection, "lease " + std::to_string(l.lease.id)); !s.ok()) return s;
  return impl_->call(rpc::Op::kRelease, rpc::ReleaseRequest{l.lease.id}).status();
}

Status StoreClient::get(const protocol::ChunkKey& key,
                        const std::function<Status(std::span<const uint8_t>)>& read) {
  auto lease = acquire(key);
  if (!lease.ok()) return lease.status();
  std::span<const uint8_t> data = bytes(*lease);
  Status read_status =
      data.size() == lease->lease.length || lease->lease.length == 0
          ? read(data)
          : Status(ErrorCode::kPeerLost, "store daemon connection ended between acquire and read");
  Status released = release(*lease);
  if (!read_status.ok()) return read_status;
  // A lease that expired before release: the bytes may have been reused while being read.
  return released;
}

Status StoreClient::pin(const protocol::ChunkKey& key) {
  std::lock_guard lock(impl_->mu);
  return impl_->call(rpc::Op::kPin, rpc::KeyRequest{key}).status();
}

Status StoreClient::unpin(const protocol::ChunkKey& key) {
  std::lock_guard lock(impl_->mu);
  return impl_->call(rpc::Op::kUnpin, rpc::KeyRequest{key}).status();
}

namespace {
Result<ClientClearResult> clear_result(const Result<rpc::Reply>& reply) {
  if (!reply.ok()) return reply.status();
  const auto& c = std::get<rpc::ClearReply>(reply->body);
  return ClientClearResult{c.removed, c.deferred, c.bytes};
}
}  // namespace

Result<ClientClearResult> StoreClient::clear_all() {
  std::lock_guard lock(impl_->mu);
  return clear_result(impl_->call(rpc::Op::kClear, rpc::ClearRequest{rpc::ClearScope::kAll, {}, {}}));
}

Result<ClientClearResult> StoreClient::clear(std::span<const protocol::ChunkKey> keys) {
  if (keys.size() > rpc::kMaxKeys) {
    return Status(ErrorCode::kInvalidArgument, "clear of " + std::to_string(keys.size()) + " keys (at most " +
                                                   std::to_string(rpc::kMaxKeys) + " per call)");
  }
  std::lock_guard lock(impl_->mu);
  return clear_result(impl_->call(rpc::Op::kClear,
                                  rpc::ClearRequest{rpc::ClearScope::kKeys, {keys.begin(), keys.end()}, {}}));
}

Result<ClientClearResult> StoreClient::clear_model(const protocol::ChunkKey& model) {
  std::lock_guard lock(impl_->mu);
  return clear_result(impl_->call(rpc::Op::kClear, rpc::ClearRequest{rpc::ClearScope::kModel, {}, model}));
}

Result<StoreStats> StoreClient::stats() {
  std::lock_guard lock(impl_->mu);
  auto reply = impl_->call(rpc::Op::kStats, rpc::EmptyRequest{});
  if (!reply.ok()) return reply.status();
  return store_stats_from_pairs(std::get<rpc::StatsReply>(reply->body).counters);
}

}  // namespace kvf::store
