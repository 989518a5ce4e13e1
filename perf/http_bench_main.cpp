// kvfabric-http-bench: requests per second of POST /lookup with N-chunk prompts over loopback,
// N keep-alive connections, against its anchor measured in the same run: a raw Beast server that
// reads the same request and writes the same reply bytes with no routing, validation or JSON.
// Rounds alternate anchor and kvfabric; medians are reported with their ratio. By default the
// ControlApi behind the real server is trivial, so the figure is the HTTP/JSON front end's own
// cost; with --daemon-port the kvfabric side is a running kvfabricd (its store's index behind
// /lookup), asked about chunk keys it holds (--keys-file, e.g. from `kvfabric-store-tool keys`).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "kvf/control/control_api.h"
#include "kvf/control/http_server.h"
#include "perf_util.h"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using namespace kvf;
using namespace kvf::control;

// Answers every lookup with one full match at once: the cost measured is the server's, not a store's.
class TrivialApi : public ControlApi {
 public:
  Result<LookupResult> lookup(const LookupRequest& request) override {
    const size_t chunks = request.by_tokens() ? request.tokens().size() / protocol::kDefaultChunkTokens
                                              : request.chunk_keys().size();
    LookupResult result;
    result.query_chunks = static_cast<uint32_t>(chunks);
    result.matches.push_back({"node-a", "prefill-0", chunks * protocol::kDefaultChunkTokens,
                              static_cast<uint32_t>(chunks), Tier::kDram});
    return result;
  }
  Result<PinResult> pin(const PinRequest&) override { return PinResult{}; }
  Result<PinResult> unpin(const PinRequest&) override { return PinResult{}; }
  Result<ClearResult> clear(const ClearRequest&) override { return ClearResult{}; }
  Result<MoveResult> move(const MoveRequest&) override { return MoveResult{}; }
  Result<CompressResult> compress(const CompressRequest&) override { return CompressResult{}; }
  HealthReport health() override { return HealthReport{}; }
  Result<ControlStats> stats() override { return ControlStats{}; }
  Result<std::string> metrics() override { return std::string(); }
};

// The anchor: the plainest Beast keep-alive server, answering every request with fixed bytes.
class AnchorServer {
 public:
  AnchorServer(std::string reply_body, size_t threads) : acceptor_(io_), body_(std::move(reply_body)) {
    const tcp::endpoint endpoint(asio::ip::make_address("127.0.0.1"), 0);
    acceptor_.open(endpoint.protocol());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind(endpoint);
    acceptor_.listen();
    accept();
    for (size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  ~AnchorServer() {
    io_.stop();
    for (auto& t : threads_) t.join();
  }
  uint16_t port() const { return acceptor_.local_endpoint().port(); }

 private:
  struct Session : std::enable_shared_from_this<Session> {
    Session(tcp::socket s, const std::string& b) : socket(std::move(s)), body(b) {}
    void read() {
      request = {};
      http::async_read(socket, buffer, request, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec) return;
        self->write();
      });
    }
    void write() {
      response = {};
      response.result(http::status::ok);
      response.version(request.version());
      response.set(http::field::content_type, "application/json");
      response.body() = body;
      response.keep_alive(request.keep_alive());
      response.prepare_payload();
      http::async_write(socket, response, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (!ec) self->read();
      });
    }
    tcp::socket socket;
    const std::string& body;
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    http::response<http::string_body> response;
  };

  void accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec) return;
      socket.set_option(tcp::no_delay(true), ec);  // as the real server does
      std::make_shared<Session>(std::move(socket), body_)->read();
      accept();
    });
  }

  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::string body_;
  std::vector<std::thread> threads_;
};

struct LoadResult {
  double requests_per_s = 0;
  double p50_us = 0;
  double p99_us = 0;
  uint64_t errors = 0;  // replies that were not 200 with the expected body, and broken connections
};

// Closed-loop load: each connection sends the request, waits for the reply, sends again.
class Load {
 public:
  Load(uint16_t port, const std::string& request_bytes, const std::string& expected_body, size_t connections)
      : request_(request_bytes), expected_(expected_body) {
    for (size_t i = 0; i < connections; ++i) {
      auto c = std::make_unique<Connection>(io_);
      c->socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
      c->socket.set_option(tcp::no_delay(true));
      connections_.push_back(std::move(c));
    }
  }

  LoadResult run(size_t threads, double warmup_s, double duration_s) {
    for (auto& c : connections_) send(*c);
    std::vector<std::thread> pool;
    for (size_t i = 0; i < threads; ++i) pool.emplace_back([this] { io_.run(); });
    std::this_thread::sleep_for(std::chrono::duration<double>(warmup_s));
    measuring_.store(true);
    const auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(duration_s));
    measuring_.store(false);
    const auto t1 = Clock::now();
    stopping_.store(true);
    for (auto& t : pool) t.join();

    LoadResult result;
    uint64_t done = 0;
    std::vector<double> latencies;
    for (auto& c : connections_) {
      done += c->done;
      result.errors += c->errors;
      latencies.insert(latencies.end(), c->latencies_us.begin(), c->latencies_us.end());
    }
    result.requests_per_s = static_cast<double>(done) / std::chrono::duration<double>(t1 - t0).count();
    result.p50_us = perf::percentile(latencies, 50);
    result.p99_us = perf::percentile(latencies, 99);
    return result;
  }

 private:
  // A connection's operations never overlap (write, then read), so it needs no strand.
  struct Connection {
    explicit Connection(asio::io_context& io) : socket(io) {}
    tcp::socket socket;
    beast::flat_buffer buffer;
    std::optional<http::response_parser<http::string_body>> parser;
    Clock::time_point sent;
    uint64_t done = 0;
    uint64_t errors = 0;
    std::vector<double> latencies_us;
  };

  void send(Connection& c) {
    if (stopping_.load(std::memory_order_relaxed)) return;
    c.sent = Clock::now();
    asio::async_write(c.socket, asio::buffer(request_), [this, &c](beast::error_code ec, size_t) {
      if (ec) {
        ++c.errors;
        return;
      }
      c.parser.emplace();
      c.parser->body_limit(64 << 20);
      http::async_read(c.socket, c.buffer, *c.parser, [this, &c](beast::error_code read_ec, size_t) {
        if (read_ec) {
          ++c.errors;
          return;
        }
        const auto& response = c.parser->get();
        const bool good = response.result() == http::status::ok && response.body() == expected_;
        if (!good) ++c.errors;
        if (measuring_.load(std::memory_order_relaxed)) {
          ++c.done;
          c.latencies_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - c.sent).count());
        }
        send(c);
      });
    });
  }

  asio::io_context io_;
  const std::string& request_;
  const std::string& expected_;
  std::vector<std::unique_ptr<Connection>> connections_;
  std::atomic<bool> measuring_{false};
  std::atomic<bool> stopping_{false};
};

// The chunk keys (32 hex digits each, whitespace-separated) of a file, in order.
std::vector<std::string> read_keys(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read --keys-file " + path);
  std::vector<std::string> keys;
  for (std::string key; in >> key;) {
    if (!protocol::ChunkKey::from_hex(key).ok()) {
      throw std::runtime_error("--keys-file " + path + ": '" + key + "' is not a 32-hex-digit chunk key");
    }
    keys.push_back(key);
  }
  if (keys.empty()) throw std::runtime_error("--keys-file " + path + " holds no keys");
  return keys;
}

std::string lookup_body(size_t chunks, bool by_tokens, const std::string& model,
                        const std::vector<std::string>& file_keys) {
  nlohmann::json body = {{"model", model}};
  if (!file_keys.empty()) {
    body["chunk_keys"] = file_keys;
  } else if (by_tokens) {
    std::vector<uint32_t> tokens(chunks * protocol::kDefaultChunkTokens);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>((i * 7919) % 128256);
    body["tokens"] = tokens;
  } else {
    const protocol::ChunkHasher hasher(protocol::ChunkKey{0x6c6c616d61, 0x38b});
    std::vector<uint32_t> tokens(chunks * protocol::kDefaultChunkTokens);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>((i * 7919) % 128256);
    nlohmann::json keys = nlohmann::json::array();
    for (const auto& key : hasher.hash(tokens)) keys.push_back(key.to_hex());
    body["chunk_keys"] = keys;
  }
  return body.dump();
}

std::string request_bytes(const std::string& body) {
  http::request<http::string_body> request{http::verb::post, "/lookup", 11};
  request.set(http::field::host, "127.0.0.1");
  request.set(http::field::content_type, "application/json");
  request.body() = body;
  request.prepare_payload();
  std::ostringstream out;
  out << request;
  return out.str();
}

// One request through a fresh connection: the reply the anchor must reproduce byte for byte.
std::string fetch_reply_body(uint16_t port, const std::string& bytes) {
  asio::io_context io;
  tcp::socket socket(io);
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  asio::write(socket, asio::buffer(bytes));
  beast::flat_buffer buffer;
  http::response<http::string_body> response;
  http::read(socket, buffer, response);
  if (response.result() != http::status::ok) {
    throw std::runtime_error("the server refused the benchmark request: " + response.body());
  }
  return response.body();
}

double median(std::vector<double> values) {
  return perf::percentile(std::move(values), 50);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli(
      "kvfabric-http-bench",
      "Requests/s of the HTTP control API's POST /lookup on loopback, against a raw Beast anchor");
  cli.add_options()                                                                             //
      ("connections", "keep-alive connections", cxxopts::value<size_t>()->default_value("8"))   //
      ("duration", "seconds measured per round", cxxopts::value<double>()->default_value("3"))  //
      ("warmup", "seconds before each round's measurement",
       cxxopts::value<double>()->default_value("0.5"))                                                  //
      ("rounds", "rounds of each side, alternating", cxxopts::value<size_t>()->default_value("3"))      //
      ("chunks", "chunks per prompt (256 tokens each)", cxxopts::value<size_t>()->default_value("64"))  //
      ("query", "what a lookup sends: keys (32-hex chunk keys) or tokens (token ids)",
       cxxopts::value<std::string>()->default_value("keys"))                                               //
      ("server-threads", "io threads of each server", cxxopts::value<size_t>()->default_value("1"))        //
      ("client-threads", "threads driving the connections", cxxopts::value<size_t>()->default_value("1"))  //
      ("daemon-port", "measure a running kvfabricd's HTTP port on 127.0.0.1 instead of the trivial API",
       cxxopts::value<uint16_t>())  //
      ("keys-file", "chunk keys to look up (hex, whitespace-separated; replaces --chunks and --query)",
       cxxopts::value<std::string>())                                                              //
      ("model", "the lookup's model", cxxopts::value<std::string>()->default_value("llama-3-8b"))  //
      ("help", "this text");
  size_t connections, rounds, chunks, server_threads, client_threads;
  double duration, warmup;
  std::string query, model;
  std::optional<uint16_t> daemon_port;
  std::vector<std::string> file_keys;
  try {
    const auto args = cli.parse(argc, argv);
    if (args.count("help") != 0) {
      std::cout << cli.help() << "\n";
      return 0;
    }
    connections = args["connections"].as<size_t>();
    duration = args["duration"].as<double>();
    warmup = args["warmup"].as<double>();
    rounds = args["rounds"].as<size_t>();
    chunks = args["chunks"].as<size_t>();
    query = args["query"].as<std::string>();
    server_threads = args["server-threads"].as<size_t>();
    client_threads = args["client-threads"].as<size_t>();
    model = args["model"].as<std::string>();
    if (args.count("daemon-port") != 0) daemon_port = args["daemon-port"].as<uint16_t>();
    if (args.count("keys-file") != 0) {
      file_keys = read_keys(args["keys-file"].as<std::string>());
      chunks = file_keys.size();
      query = "keys";
    }
    if (query != "keys" && query != "tokens") throw std::invalid_argument("--query must be keys or tokens");
    if (connections == 0 || rounds == 0 || server_threads == 0 || client_threads == 0 || duration <= 0 ||
        warmup < 0) {
      throw std::invalid_argument("--connections, --rounds, --*-threads and --duration must be positive");
    }
  } catch (const std::exception& e) {
    std::cerr << "kvfabric-http-bench: " << e.what() << "\n";
    return 2;
  }

  try {
    const std::string body = lookup_body(chunks, query == "tokens", model, file_keys);
    const std::string bytes = request_bytes(body);

    std::unique_ptr<HttpControlServer> trivial;
    uint16_t kvf_port = 0;
    if (daemon_port) {
      kvf_port = *daemon_port;
    } else {
      HttpServerOptions options;
      options.io_threads = server_threads;
      auto started = HttpControlServer::start(std::make_shared<TrivialApi>(), options);
      if (!started.ok()) {
        std::cerr << "kvfabric-http-bench: " << started.status().to_string() << "\n";
        return 1;
      }
      trivial = std::move(started.value());
      kvf_port = trivial->port();
    }
    const std::string reply = fetch_reply_body(kvf_port, bytes);
    AnchorServer anchor(reply, server_threads);
    if (daemon_port)
      std::printf("kvfabric-http-bench: the daemon on port %u answers: %s\n", kvf_port, reply.c_str());

    std::printf(
        "kvfabric-http-bench: POST /lookup, %zu chunks as %s (%zu-byte body, %zu-byte reply), %zu keep-alive "
        "connections, %zu server io thread(s), %zu client thread(s), %zu rounds x %.1f s (+%.1f s warm-up)\n",
        chunks, query == "tokens" ? "token ids" : "chunk keys", body.size(), reply.size(), connections,
        server_threads, client_threads, rounds, duration, warmup);
    std::printf("%-6s %14s %16s %7s %12s %12s %8s\n", "round", "anchor req/s", "kvfabric req/s", "ratio",
                "kvf p50 us", "kvf p99 us", "errors");
    std::vector<double> anchor_rps, kvf_rps, kvf_p50, kvf_p99;
    uint64_t errors = 0;
    for (size_t round = 0; round < rounds; ++round) {
      const LoadResult a =
          Load(anchor.port(), bytes, reply, connections).run(client_threads, warmup, duration);
      const LoadResult k = Load(kvf_port, bytes, reply, connections).run(client_threads, warmup, duration);
      anchor_rps.push_back(a.requests_per_s);
      kvf_rps.push_back(k.requests_per_s);
      kvf_p50.push_back(k.p50_us);
      kvf_p99.push_back(k.p99_us);
      errors += a.errors + k.errors;
      std::printf("%-6zu %14.0f %16.0f %7.2f %12.1f %12.1f %8llu\n", round + 1, a.requests_per_s,
                  k.requests_per_s, k.requests_per_s / a.requests_per_s, k.p50_us, k.p99_us,
                  static_cast<unsigned long long>(a.errors + k.errors));
    }
    const double a = median(anchor_rps);
    const double k = median(kvf_rps);
    std::printf("median anchor (raw Beast, same reply bytes, no routing/validation/JSON): %.0f req/s\n", a);
    std::printf("median kvfabric POST /lookup: %.0f req/s (p50 %.1f us, p99 %.1f us)\n", k, median(kvf_p50),
                median(kvf_p99));
    std::printf("ratio kvfabric/anchor: %.2f\n", k / a);
    std::printf("issue 4 target >= 10000 req/s: %s\n", k >= 10000 ? "met" : "NOT met");
    if (errors != 0) {
      std::printf("FAILED: %llu replies were not 200 with the expected body\n",
                  static_cast<unsigned long long>(errors));
      return 1;
    }
  } catch (const std::exception& e) {
    std::cerr << "kvfabric-http-bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
