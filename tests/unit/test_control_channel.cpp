// The control channel over real loopback TCP: echo of every message type, ordering under
// concurrent senders, large frames, hostile and broken peers, timeouts and clean/unclean closes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <xxhash.h>

#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>

#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include "catch.h"

#include "kvf/fabric/control_channel.h"

using namespace std::chrono_literals;
using kvf::ErrorCode;
using kvf::Status;
using kvf::fabric::BlockingControlClient;
using kvf::fabric::ControlConnection;
using kvf::fabric::ControlContext;
using kvf::fabric::ControlOptions;
using kvf::fabric::ControlServer;
namespace proto = kvf::protocol;
using Clock = std::chrono::steady_clock;

namespace {

// Close statuses reported by server-side connections, in the order they arrived.
class CloseLog {
 public:
  void add(const Status& s) {
    std::lock_guard lock(mutex_);
    statuses_.push_back(s);
    cv_.notify_all();
  }
  bool wait_for_count(size_t n, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return statuses_.size() >= n; });
  }
  std::vector<Status> snapshot() {
    std::lock_guard lock(mutex_);
    return statuses_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<Status> statuses_;
};

// A server on 127.0.0.1:0 that echoes every message back on the connection it came from.
class EchoServer {
 public:
  explicit EchoServer(ControlOptions options = {}) : ctx_(std::make_unique<ControlContext>()) {
    auto listening = ControlServer::listen(
        ctx_->io(), "127.0.0.1", 0,
        [this](std::shared_ptr<ControlConnection> connection) {
          {
            std::lock_guard lock(mutex_);
            connections_.push_back(connection);
            cv_.notify_all();
          }
          // weak: a connection that owned a handler owning itself would never be freed.
          std::weak_ptr<ControlConnection> weak = connection;
          connection->start(
              [weak](const proto::Message& message) {
                if (auto self = weak.lock()) self->send(message);
              },
              [this](const Status& status) { closes.add(status); });
        },
        options);
    REQUIRE(listening.ok());
    server_ = std::move(listening).value();
  }
  ~EchoServer() {
    // The server before its io_context; the io thread joined before closes goes away.
    server_.reset();
    {
      // Connections must not outlive their io_context either; pending handlers hold the rest.
      std::lock_guard lock(mutex_);
      connections_.clear();
    }
    ctx_.reset();
  }

  uint16_t port() const { return server_->port(); }

  std::shared_ptr<ControlConnection> wait_for_connection(size_t index) {
    std::unique_lock lock(mutex_);
    REQUIRE(cv_.wait_for(lock, 5s, [&] { return connections_.size() > index; }));
    return connections_[index];
  }

  BlockingControlClient client() {
    auto connected = BlockingControlClient::connect("127.0.0.1", port(), 2s);
    REQUIRE(connected.ok());
    return std::move(connected).value();
  }

  // The server still answers a fresh client after whatever happened before.
  void require_serving() {
    BlockingControlClient c = client();
    const proto::Message ping = proto::Bye{"still there?"};
    REQUIRE(c.send(ping).ok());
    auto echoed = c.receive(5s);
    REQUIRE(echoed.ok());
    REQUIRE(*echoed == ping);
  }

  CloseLog closes;

 private:
  std::unique_ptr<ControlContext> ctx_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<ControlConnection>> connections_;
  std::unique_ptr<ControlServer> server_;
};

proto::KvLayoutDesc sample_layout() {
  proto::KvLayoutDesc d;
  d.kind = proto::KvLayoutKind::kFlashInfer;
  d.num_layers = 32;
  d.num_blocks = 1024;
  d.block_tokens = 16;
  d.kv_heads = 8;
  d.head_dim = 128;
  d.dtype_bytes = 2;
  return d;
}

proto::RegionDescriptor sample_region(uint64_t id) {
  return {id,
          0x7f0000000000 + id * 4096,
          1 << 20,
          proto::MemoryKind::kPinnedHost,
          {1, 2, 3, static_cast<uint8_t>(id)},
          {9, 8, static_cast<uint8_t>(id)}};
}

std::vector<proto::Message> one_of_each_type() {
  std::vector<proto::Message> all;
  all.push_back(proto::Hello{1, 1, "prefill-0", {0xde, 0xad}, {0xbe, 0xef}});
  all.push_back(proto::HelloAck{1, "decode-0", {9, 8, 7}, 42});
  all.push_back(proto::RegionGrant{7, sample_layout(), {sample_region(1), sample_region(2)}});
  all.push_back(proto::StreamOffer{
      11, sample_layout(), 64, 1234, proto::kStreamVerify | proto::kStreamShuffle, {1, 2, 3}});
  all.push_back(proto::RecvPlan{11, 7, {5, 3, 9, 1}});
  all.push_back(
      proto::StreamResult{11, ErrorCode::kVerifyFailed, "layer 3 differs", 1 << 20, 1 << 19, {10, 20, 30}});
  all.push_back(proto::Abort{11, ErrorCode::kAborted, "client went away"});
  all.push_back(proto::RunRequest{3, proto::RunMode::kLatency, 4096, 1000});
  all.push_back(proto::RunResult{3, ErrorCode::kOk, "", sample_region(5)});
  all.push_back(proto::ErrorReply{ErrorCode::kMalformed, "you sent garbage"});
  all.push_back(proto::Bye{"done"});
  return all;
}

// A plain POSIX socket, for bytes no well-behaved client would send.
class RawSocket {
 public:
  explicit RawSocket(uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    REQUIRE(fd_ >= 0);
    timeval tv{5, 0};  // a broken server must fail the test, not hang it
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawSocket() { ::close(fd_); }
  RawSocket(const RawSocket&) = delete;
  RawSocket& operator=(const RawSocket&) = delete;

  void write(const std::vector<uint8_t>& bytes) {
    size_t sent = 0;
    while (sent < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      REQUIRE(n > 0);
      sent += static_cast<size_t>(n);
    }
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }
  // Everything the peer sends until it closes; `closed` tells a close from the 5 s receive timeout.
  std::vector<uint8_t> read_to_eof(bool& closed) {
    std::vector<uint8_t> all;
    uint8_t buffer[4096];
    for (;;) {
      const ssize_t n = ::recv(fd_, buffer, sizeof buffer, 0);
      if (n > 0) {
        all.insert(all.end(), buffer, buffer + n);
        continue;
      }
      closed = n == 0 || errno == ECONNRESET;
      return all;
    }
  }

 private:
  int fd_;
};

void put_u16(std::vector<uint8_t>& frame, size_t at, uint16_t v) {
  frame[at] = static_cast<uint8_t>(v);
  frame[at + 1] = static_cast<uint8_t>(v >> 8);
}
void put_u32(std::vector<uint8_t>& frame, size_t at, uint32_t v) {
  for (size_t i = 0; i < 4; ++i) frame[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

std::vector<uint8_t> bye_frame(size_t reason_bytes = 8) {
  return proto::encode_frame(proto::Bye{std::string(reason_bytes, 'r')});
}

uint16_t unused_port() {
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor acceptor(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return acceptor.local_endpoint().port();  // closed again when acceptor goes
}

}  // namespace

TEST_CASE("every message type echoes back unchanged", "[control]") {
  EchoServer server;
  BlockingControlClient client = server.client();
  const auto messages = one_of_each_type();
  REQUIRE(messages.size() == std::variant_size_v<proto::Message>);
  for (const auto& m : messages) REQUIRE(client.send(m).ok());
  for (const auto& m : messages) {
    auto echoed = client.receive(5s);
    REQUIRE(echoed.ok());
    CHECK(proto::message_type(*echoed) == proto::message_type(m));
    CHECK(*echoed == m);
  }
}

TEST_CASE("two client threads each get their messages back in order", "[control]") {
  EchoServer server;
  constexpr uint32_t kPerThread = 2000;
  // No Catch2 assertions on these threads: Catch2 is not thread-safe; failures come back as text.
  auto run = [&](uint64_t tag, std::string& failure) {
    auto connected = BlockingControlClient::connect("127.0.0.1", server.port(), 2s);
    if (!connected.ok()) {
      failure = connected.status().to_string();
      return;
    }
    BlockingControlClient client = std::move(connected).value();
    for (uint32_t i = 0; i < kPerThread; ++i) {
      if (!client.send(proto::RunRequest{tag << 32 | i, proto::RunMode::kBandwidth, i, 0}).ok()) {
        failure = "send failed";
        return;
      }
    }
    for (uint32_t i = 0; i < kPerThread; ++i) {
      auto m = client.receive(10s);
      if (!m.ok()) {
        failure = m.status().to_string();
        return;
      }
      const auto* req = std::get_if<proto::RunRequest>(&*m);
      if (req == nullptr || req->run_id != (tag << 32 | i)) {
        failure = "out of order at " + std::to_string(i);
        return;
      }
    }
  };
  std::string failure_a, failure_b;
  std::thread a(run, 1, std::ref(failure_a));
  std::thread b(run, 2, std::ref(failure_b));
  a.join();
  b.join();
  CHECK(failure_a.empty());
  CHECK(failure_b.empty());
}

TEST_CASE("ControlConnection::send from two threads keeps each thread's order", "[control]") {
  EchoServer server;
  BlockingControlClient client = server.client();
  auto connection = server.wait_for_connection(0);
  constexpr uint64_t kPerThread = 3000;
  auto produce = [&](uint64_t tag) {
    for (uint64_t i = 0; i < kPerThread; ++i)
      connection->send(proto::Abort{tag << 32 | i, ErrorCode::kAborted, ""});
  };
  std::thread a(produce, 1);
  std::thread b(produce, 2);
  uint64_t next[3] = {0, 0, 0};
  for (uint64_t i = 0; i < 2 * kPerThread; ++i) {
    auto m = client.receive(10s);
    REQUIRE(m.ok());
    const auto& abort = std::get<proto::Abort>(*m);
    const uint64_t tag = abort.request_id >> 32;
    REQUIRE((tag == 1 || tag == 2));
    REQUIRE((abort.request_id & 0xffffffffu) == next[tag]);
    ++next[tag];
  }
  a.join();
  b.join();
  CHECK(next[1] == kPerThread);
  CHECK(next[2] == kPerThread);
}

TEST_CASE("a RecvPlan of a million blocks crosses intact", "[control]") {
  EchoServer server;
  BlockingControlClient client = server.client();
  proto::RecvPlan plan{99, 7, {}};
  plan.dst_blocks.resize(1'000'000);
  for (uint32_t i = 0; i < plan.dst_blocks.size(); ++i) plan.dst_blocks[i] = i * 2654435761u;
  const proto::Message sent = plan;
  REQUIRE(client.send(sent).ok());
  auto echoed = client.receive(10s);
  REQUIRE(echoed.ok());
  CHECK(*echoed == sent);
  server.require_serving();
}

TEST_CASE("garbled frames close the connection with the right status; the server keeps serving",
          "[control]") {
  EchoServer server;
  struct Case {
    const char* name;
    std::vector<uint8_t> bytes;
    ErrorCode code;
  };
  std::vector<Case> cases;
  {
    auto f = bye_frame();
    f[0] ^= 0xff;
    cases.push_back({"bad magic", f, ErrorCode::kMalformed});
  }
  {
    auto f = bye_frame();
    put_u16(f, 4, proto::kProtocolVersion + 1);
    cases.push_back({"wrong version", f, ErrorCode::kUnsupportedVersion});
  }
  {
    auto f = bye_frame();
    put_u16(f, 6, 999);
    cases.push_back({"unknown type", f, ErrorCode::kMalformed});
  }
  {
    // Only the header: the server must refuse before it would wait for (or allocate) the payload.
    auto f = bye_frame();
    put_u32(f, 8, proto::kMaxFramePayload + 1);
    f.resize(proto::kFrameHeaderBytes);
    cases.push_back({"oversized length", f, ErrorCode::kMalformed});
  }
  {
    auto f = bye_frame();
    f[12] ^= 0x01;
    cases.push_back({"bad checksum", f, ErrorCode::kMalformed});
  }
  {
    // Checksum right, payload not a Bye: the string length runs past the end.
    auto f = bye_frame();
    f.resize(proto::kFrameHeaderBytes + 3);
    f[16] = f[17] = f[18] = 0xff;
    put_u32(f, 8, 3);
    put_u32(f, 12, XXH32(f.data() + proto::kFrameHeaderBytes, 3, 0));
    cases.push_back({"undecodable payload", f, ErrorCode::kMalformed});
  }

  size_t closes = 0;
  for (const auto& c : cases) {
    INFO(c.name);
    RawSocket raw(server.port());
    raw.write(c.bytes);
    bool closed = false;
    const auto reply_bytes = raw.read_to_eof(closed);
    CHECK(closed);
    auto reply = proto::decode_frame(reply_bytes);
    REQUIRE(reply.ok());
    const auto* error = std::get_if<proto::ErrorReply>(&*reply);
    REQUIRE(error != nullptr);
    CHECK(error->code == c.code);
    CHECK_FALSE(error->message.empty());
    ++closes;
    REQUIRE(server.closes.wait_for_count(closes, 5s));
    const Status status = server.closes.snapshot().back();
    CHECK(status.code() == c.code);
    CHECK(status.message() == error->message);
    server.require_serving();
    ++closes;  // require_serving's client closing
    REQUIRE(server.closes.wait_for_count(closes, 5s));
  }
}

TEST_CASE("a peer that closes inside a frame is lost, with no reply", "[control]") {
  EchoServer server;
  RawSocket raw(server.port());
  auto f = bye_frame(100);
  f.resize(proto::kFrameHeaderBytes + 10);
  raw.write(f);
  raw.shutdown_write();
  bool closed = false;
  CHECK(raw.read_to_eof(closed).empty());
  CHECK(closed);
  REQUIRE(server.closes.wait_for_count(1, 5s));
  const Status status = server.closes.snapshot()[0];
  CHECK(status.code() == ErrorCode::kPeerLost);
  CHECK(status.message().find("middle of a frame") != std::string::npos);
  server.require_serving();
}

TEST_CASE("a frame that stalls times out; an idle connection does not", "[control]") {
  ControlOptions options;
  options.read_timeout = 300ms;
  EchoServer server(options);

  SECTION("header, then silence") {
    RawSocket raw(server.port());
    auto f = bye_frame(100);
    f.resize(proto::kFrameHeaderBytes);
    const auto start = Clock::now();
    raw.write(f);
    bool closed = false;
    auto reply = proto::decode_frame(raw.read_to_eof(closed));
    const auto waited = Clock::now() - start;
    CHECK(closed);
    CHECK(waited >= 250ms);
    CHECK(waited < 3s);
    REQUIRE(reply.ok());
    CHECK(std::get<proto::ErrorReply>(*reply).code == ErrorCode::kTimeout);
    REQUIRE(server.closes.wait_for_count(1, 5s));
    CHECK(server.closes.snapshot()[0].code() == ErrorCode::kTimeout);
  }
  SECTION("part of a header, then silence") {
    RawSocket raw(server.port());
    auto f = bye_frame();
    f.resize(5);
    raw.write(f);
    bool closed = false;
    auto reply = proto::decode_frame(raw.read_to_eof(closed));
    CHECK(closed);
    REQUIRE(reply.ok());
    CHECK(std::get<proto::ErrorReply>(*reply).code == ErrorCode::kTimeout);
    REQUIRE(server.closes.wait_for_count(1, 5s));
    CHECK(server.closes.snapshot()[0].code() == ErrorCode::kTimeout);
  }
  SECTION("idle between frames for longer than the read timeout") {
    BlockingControlClient client = server.client();
    const proto::Message m = proto::Bye{"first"};
    REQUIRE(client.send(m).ok());
    REQUIRE(client.receive(5s).ok());
    std::this_thread::sleep_for(900ms);
    REQUIRE(client.send(m).ok());
    auto echoed = client.receive(5s);
    REQUIRE(echoed.ok());
    CHECK(*echoed == m);
    CHECK(server.closes.snapshot().empty());
  }
  server.require_serving();
}

TEST_CASE("the optional idle timeout closes a silent connection", "[control]") {
  ControlOptions options;
  options.idle_timeout = 200ms;
  EchoServer server(options);
  BlockingControlClient client = server.client();
  auto reply = client.receive(5s);
  REQUIRE(reply.ok());
  CHECK(std::get<proto::ErrorReply>(*reply).code == ErrorCode::kTimeout);
  auto after = client.receive(5s);
  REQUIRE_FALSE(after.ok());
  CHECK(after.status().code() == ErrorCode::kPeerLost);
  REQUIRE(server.closes.wait_for_count(1, 5s));
  CHECK(server.closes.snapshot()[0].code() == ErrorCode::kTimeout);
}

TEST_CASE("a client that closes mid-stream is reported lost exactly once", "[control]") {
  EchoServer server;
  {
    BlockingControlClient client = server.client();
    for (int i = 0; i < 100; ++i) REQUIRE(client.send(proto::Bye{"x"}).ok());
    client.close();
    CHECK(client.send(proto::Bye{"after close"}).code() == ErrorCode::kPeerLost);
    CHECK(client.receive(1s).status().code() == ErrorCode::kPeerLost);
  }
  REQUIRE(server.closes.wait_for_count(1, 5s));
  std::this_thread::sleep_for(300ms);
  const auto statuses = server.closes.snapshot();
  REQUIRE(statuses.size() == 1);
  CHECK(statuses[0].code() == ErrorCode::kPeerLost);
}

TEST_CASE("a local close flushes queued frames and reports its reason once", "[control]") {
  EchoServer server;
  BlockingControlClient client = server.client();
  auto connection = server.wait_for_connection(0);
  CHECK(connection->remote().rfind("127.0.0.1:", 0) == 0);
  connection->send(proto::Bye{"going away"});
  connection->close(Status(ErrorCode::kAborted, "test is done"));
  connection->close(Status(ErrorCode::kInternal, "second close is ignored"));
  auto bye = client.receive(5s);
  REQUIRE(bye.ok());
  CHECK(std::get<proto::Bye>(*bye).reason == "going away");
  auto lost = client.receive(5s);
  REQUIRE_FALSE(lost.ok());
  CHECK(lost.status().code() == ErrorCode::kPeerLost);
  REQUIRE(server.closes.wait_for_count(1, 5s));
  std::this_thread::sleep_for(200ms);
  const auto statuses = server.closes.snapshot();
  REQUIRE(statuses.size() == 1);
  CHECK(statuses[0].code() == ErrorCode::kAborted);
  CHECK(statuses[0].message() == "test is done");
}

TEST_CASE("close_and_wait: a frame queued before close reaches the peer although the context stops next",
          "[control]") {
  // The owner's shutdown order (close, wait_closed, stop the context) with the io thread held
  // busy, so that the send and the close are still only queued when the owner wants to stop:
  // stopping the context without waiting would drop the frame.
  auto ctx = std::make_unique<ControlContext>();
  std::promise<std::shared_ptr<ControlConnection>> accepted;
  auto listening =
      ControlServer::listen(ctx->io(), "127.0.0.1", 0, [&](std::shared_ptr<ControlConnection> c) {
        c->start([](const proto::Message&) {}, [](const Status&) {});
        accepted.set_value(std::move(c));
      });
  REQUIRE(listening.ok());
  auto connected = BlockingControlClient::connect("127.0.0.1", listening.value()->port(), 2s);
  REQUIRE(connected.ok());
  BlockingControlClient client = std::move(connected).value();
  auto accepted_future = accepted.get_future();
  REQUIRE(accepted_future.wait_for(5s) == std::future_status::ready);
  std::shared_ptr<ControlConnection> connection = accepted_future.get();

  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  boost::asio::post(ctx->io(), [released] { released.wait(); });
  connection->send(proto::Bye{"last words"});
  // The io thread is held: nothing is written yet, so the connection has not ended in time.
  CHECK(ctx->close_and_wait({connection}, Status(ErrorCode::kAborted, "owner stopping"), 100ms).size() == 1);
  std::thread releaser([&] {
    std::this_thread::sleep_for(200ms);
    release.set_value();
  });
  CHECK(connection->wait_closed(5s));
  releaser.join();
  listening.value()->stop();
  listening.value().reset();
  connection.reset();
  ctx->stop();

  auto bye = client.receive(5s);
  REQUIRE(bye.ok());
  CHECK(std::get<proto::Bye>(*bye).reason == "last words");
  CHECK(client.receive(5s).status().code() == ErrorCode::kPeerLost);
}

TEST_CASE("BlockingControlClient: timeouts, refused connections and garbage", "[control]") {
  SECTION("receive times out and the stream stays usable") {
    EchoServer server;
    BlockingControlClient client = server.client();
    const auto start = Clock::now();
    auto nothing = client.receive(100ms);
    CHECK(Clock::now() - start < 2s);
    REQUIRE_FALSE(nothing.ok());
    CHECK(nothing.status().code() == ErrorCode::kTimeout);
    const proto::Message m = proto::Bye{"later"};
    REQUIRE(client.send(m).ok());
    auto echoed = client.receive(5s);
    REQUIRE(echoed.ok());
    CHECK(*echoed == m);
  }
  SECTION("a closed port is refused at once, naming the address") {
    const uint16_t port = unused_port();
    const auto start = Clock::now();
    auto refused = BlockingControlClient::connect("127.0.0.1", port, 2s);
    CHECK(Clock::now() - start < 2s);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().code() == ErrorCode::kPeerLost);
    CHECK(refused.status().message().find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
  }
  SECTION("a listener that never answers the handshake times out, naming the address") {
    // With a backlog of 0 Linux queues one connection and drops further SYNs, so the next
    // connect hangs in the handshake, the way an unreachable host does.
    boost::asio::io_context io;
    boost::asio::ip::tcp::acceptor full(io, boost::asio::ip::tcp::v4());
    full.bind({boost::asio::ip::make_address("127.0.0.1"), 0});
    full.listen(0);
    const uint16_t port = full.local_endpoint().port();
    boost::asio::ip::tcp::socket first(io);
    first.connect(full.local_endpoint());
    std::this_thread::sleep_for(50ms);
    const auto start = Clock::now();
    auto stalled = BlockingControlClient::connect("127.0.0.1", port, 300ms);
    const auto waited = Clock::now() - start;
    CHECK(waited >= 250ms);
    CHECK(waited < 2s);
    REQUIRE_FALSE(stalled.ok());
    CHECK(stalled.status().code() == ErrorCode::kTimeout);
    CHECK(stalled.status().message().find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
  }
  SECTION("a name resolves") {
    EchoServer server;
    auto by_name = BlockingControlClient::connect("localhost", server.port(), 2s);
    REQUIRE(by_name.ok());
  }
  SECTION("a server that sends garbage gives kMalformed, every time after too") {
    boost::asio::io_context io;
    boost::asio::ip::tcp::acceptor acceptor(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
    auto client = BlockingControlClient::connect("127.0.0.1", acceptor.local_endpoint().port(), 2s);
    REQUIRE(client.ok());
    auto peer = acceptor.accept();
    auto f = bye_frame();
    f[0] ^= 0xff;
    boost::asio::write(peer, boost::asio::buffer(f));
    auto garbage = client->receive(2s);
    REQUIRE_FALSE(garbage.ok());
    CHECK(garbage.status().code() == ErrorCode::kMalformed);
    CHECK(client->receive(100ms).status().code() == ErrorCode::kMalformed);
  }
}

TEST_CASE("ControlServer refuses a port in use, naming it", "[control]") {
  EchoServer first;
  ControlContext ctx;
  auto second = ControlServer::listen(ctx.io(), "127.0.0.1", first.port(), [](auto) {});
  REQUIRE_FALSE(second.ok());
  CHECK(second.status().message().find("127.0.0.1:" + std::to_string(first.port())) != std::string::npos);
  auto no_handler = ControlServer::listen(ctx.io(), "127.0.0.1", 0, nullptr);
  CHECK_FALSE(no_handler.ok());
}

TEST_CASE("parse_host_port", "[control]") {
  using kvf::fabric::parse_host_port;
  auto v4 = parse_host_port("127.0.0.1:7000");
  REQUIRE(v4.ok());
  CHECK(v4->first == "127.0.0.1");
  CHECK(v4->second == 7000);
  auto v6 = parse_host_port("[::1]:7000");
  REQUIRE(v6.ok());
  CHECK(v6->first == "::1");
  CHECK(v6->second == 7000);
  auto name = parse_host_port("localhost:65535");
  REQUIRE(name.ok());
  CHECK(name->first == "localhost");
  CHECK(name->second == 65535);
  for (const char* bad : {"127.0.0.1", "127.0.0.1:", ":7000", "host:70000", "host:7x", "host:-1", "::1:7000",
                          "[::1]", "[::1]7000", "[::1:7000", ""}) {
    INFO(bad);
    auto r = parse_host_port(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == ErrorCode::kInvalidArgument);
    CHECK_FALSE(r.status().message().empty());
  }
}
