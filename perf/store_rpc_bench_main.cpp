// kvfabric-store-rpc-bench: lookups per second over the store RPC against a running kvfabricd,
// beside the anchor: the same request and reply sizes bounced off a bare Unix-socket echo server
// in this process (one round trip per request, no framing checks, no store; both ends wait for a
// frame as StoreClient and the daemon do: a few hundred non-blocking reads, then poll). Runs alternate
// between the two, each --duration seconds, --rounds rounds; prints medians and the ratio.
//   kvfabric-store-rpc-bench --socket /tmp/kvfabric-local.sock [--chunks 64] [--connections 1]
// Each connection is one thread with its own StoreClient (calls on one connection are serialized).
// The first run stores the prompt's chunks (tiny ones) so that lookups are hits.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/protocol/chunk_key.h"
#include "kvf/store/store_client.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

std::vector<protocol::ChunkKey> prompt_keys(uint32_t chunks, uint32_t salt) {
  protocol::KvLayoutDesc layout;
  const protocol::ChunkHasher hasher(protocol::model_fingerprint("kvfabric-store-rpc-bench", layout), 2);
  std::vector<protocol::ChunkKey> keys;
  protocol::ChunkKey previous;
  for (uint32_t i = 0; i < chunks; ++i) {
    const uint32_t tokens[2] = {salt, i};
    previous = hasher.next(previous, tokens);
    keys.push_back(previous);
  }
  return keys;
}

bool write_all(int fd, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    const ssize_t w = ::send(fd, b, n, MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
    if (w <= 0) return false;
    b += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}
// Reads n bytes from a non-blocking socket the way StoreClient and the daemon wait for a frame:
// a few hundred attempts, then poll. The anchor thus pays the same wake-ups as the RPC, no more.
bool read_all(int fd, void* p, size_t n) {
  auto* b = static_cast<uint8_t*>(p);
  int spun = 0;
  while (n > 0) {
    const ssize_t r = ::recv(fd, b, n, 0);
    if (r > 0) {
      b += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (spun++ < 200) continue;
      pollfd pfd{fd, POLLIN, 0};
      ::poll(&pfd, 1, 1000);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    return false;
  }
  return true;
}

void make_non_blocking(int fd) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
}

// The anchor: a Unix-socket server that answers each `request_bytes` with `reply_bytes`.
class EchoServer {
 public:
  EchoServer(std::string path, size_t request_bytes, size_t reply_bytes)
      : path_(std::move(path)), request_(request_bytes), reply_(reply_bytes) {
    ::unlink(path_.c_str());
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path_.c_str());
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(listen_fd_, 16) != 0) {
      std::perror("echo server");
      std::exit(1);
    }
    acceptor_ = std::thread([this] {
      for (;;) {
        const int fd = ::accept(listen_fd_, nullptr, nullptr);
        if (fd < 0) return;
        workers_.emplace_back([this, fd] {
          make_non_blocking(fd);
          std::vector<uint8_t> in(request_), out(reply_);
          while (read_all(fd, in.data(), in.size()) && write_all(fd, out.data(), out.size())) {
          }
          ::close(fd);
        });
      }
    });
  }
  ~EchoServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    ::close(listen_fd_);
    acceptor_.join();
    for (auto& w : workers_) w.join();
    ::unlink(path_.c_str());
  }
  int connect() const {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path_.c_str());
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return -1;
    make_non_blocking(fd);
    return fd;
  }

 private:
  std::string path_;
  size_t request_, reply_;
  int listen_fd_ = -1;
  std::thread acceptor_;
  std::vector<std::thread> workers_;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-store-rpc-bench",
                           "store RPC lookups/s vs a bare Unix-socket round trip");
  options.add_options()("socket", "kvfabricd's store socket", cxxopts::value<std::string>())  //
      ("chunks", "chunk keys per lookup", cxxopts::value<uint32_t>()->default_value("64"))    //
      ("connections", "client threads, one connection each",
       cxxopts::value<uint32_t>()->default_value("1"))                               //
      ("duration", "seconds per run", cxxopts::value<double>()->default_value("2"))  //
      ("rounds", "rounds", cxxopts::value<int>()->default_value("5"))                //
      ("h,help", "help");
  const auto args = options.parse(argc, argv);
  if (args.count("help") || !args.count("socket")) {
    std::printf("%s\n", options.help().c_str());
    return args.count("help") ? 0 : 2;
  }
  const std::string socket = args["socket"].as<std::string>();
  const uint32_t chunks = args["chunks"].as<uint32_t>();
  const uint32_t connections = std::max(1u, args["connections"].as<uint32_t>());
  const auto duration = std::chrono::duration<double>(args["duration"].as<double>());
  const auto keys = prompt_keys(chunks, 7);

  {  // The prompt's chunks, so lookups hit all the way.
    store::StoreClient client(store::StoreClientOptions{socket, "store-rpc-bench setup"});
    for (const auto& k : keys) {
      const uint8_t byte = 1;
      Status s = client.put(k, std::span<const uint8_t>(&byte, 1));
      if (!s.ok() && s.code() != ErrorCode::kAborted) {
        std::fprintf(stderr, "kvfabric-store-rpc-bench: storing the prompt: %s\n", s.to_string().c_str());
        return 1;
      }
    }
    auto held = client.lookup(keys);
    if (!held.ok() || held.value() != keys.size()) {
      std::fprintf(stderr,
                   "kvfabric-store-rpc-bench: the daemon does not hold the prompt after storing it\n");
      return 1;
    }
  }
  // Request: the store RPC header (24 bytes) + count + 16-byte keys; reply: header + error + count.
  const size_t request_bytes = 24 + 4 + 16 * size_t{chunks};
  const size_t reply_bytes = 24 + 2 + 8;
  EchoServer echo("/tmp/kvfabric-rpc-bench-echo-" + std::to_string(::getpid()) + ".sock", request_bytes,
                  reply_bytes);

  auto run = [&](bool rpc) {
    std::atomic<uint64_t> done{0};
    std::atomic<bool> failed{false};
    std::vector<std::thread> threads;
    const auto end = Clock::now() + duration;
    const auto start = Clock::now();
    for (uint32_t c = 0; c < connections; ++c) {
      threads.emplace_back([&, c] {
        uint64_t n = 0;
        if (rpc) {
          store::StoreClient client(
              store::StoreClientOptions{socket, "store-rpc-bench " + std::to_string(c)});
          while (Clock::now() < end) {
            auto held = client.lookup(keys);
            if (!held.ok() || held.value() != keys.size()) {
              failed = true;
              return;
            }
            ++n;
          }
        } else {
          const int fd = echo.connect();
          std::vector<uint8_t> req(request_bytes, 1), rep(reply_bytes);
          while (fd >= 0 && Clock::now() < end) {
            if (!write_all(fd, req.data(), req.size()) || !read_all(fd, rep.data(), rep.size())) {
              failed = true;
              break;
            }
            ++n;
          }
          if (fd >= 0) ::close(fd);
        }
        done += n;
      });
    }
    for (auto& t : threads) t.join();
    if (failed) {
      std::fprintf(stderr, "kvfabric-store-rpc-bench: a %s run failed\n", rpc ? "store RPC" : "anchor");
      std::exit(1);
    }
    return static_cast<double>(done) / std::chrono::duration<double>(Clock::now() - start).count();
  };
  std::vector<double> rpc_rates, raw_rates;
  for (int r = 0; r < args["rounds"].as<int>(); ++r) {
    if (r % 2) {
      rpc_rates.push_back(run(true));
      raw_rates.push_back(run(false));
    } else {
      raw_rates.push_back(run(false));
      rpc_rates.push_back(run(true));
    }
    std::fprintf(stderr, "round %d: rpc %.0f/s, unix-socket round trip %.0f/s\n", r + 1, rpc_rates.back(),
                 raw_rates.back());
  }
  const double rpc = median(rpc_rates), raw = median(raw_rates);
  std::printf(
      "lookup of %u chunk keys, %u connection(s): store RPC %.0f req/s (%.1f M keys/s); bare Unix-socket "
      "round trip of the same sizes %.0f req/s; ratio %.2f\n",
      chunks, connections, rpc, rpc * chunks / 1e6, raw, rpc / raw);
  return 0;
}
