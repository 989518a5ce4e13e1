// The HTTP/JSON control server over real loopback TCP, driven by a Beast client: every route's happy
// path, every class of bad input (each followed by a good request, proving the server still serves),
// garbage on the wire, keep-alive reuse, pipelining, timeouts, concurrent clients and a slow
// operation that must not hold up the others. Behind the server is a fake ControlApi (our own
// interface) that records what it was asked.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>
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
#include <nlohmann/json.hpp>
#include "catch.h"

#include "kvf/control/control_api.h"
#include "kvf/control/http_server.h"
// Private to the control module: the two decoding paths and the hand-written lookup reply, checked
// directly below against the full JSON library.
#include "../../control/json_reply.h"
#include "../../control/json_request.h"

using namespace std::chrono_literals;
using kvf::ErrorCode;
using kvf::Result;
using kvf::Status;
using kvf::control::ChunkKey;
using kvf::control::ClearRequest;
using kvf::control::ClearResult;
using kvf::control::CompressRequest;
using kvf::control::CompressResult;
using kvf::control::ControlApi;
using kvf::control::ControlStats;
using kvf::control::HealthReport;
using kvf::control::HttpControlServer;
using kvf::control::HttpServerOptions;
using kvf::control::LookupMatch;
using kvf::control::LookupRequest;
using kvf::control::LookupResult;
using kvf::control::MoveRequest;
using kvf::control::MoveResult;
using kvf::control::PinRequest;
using kvf::control::PinResult;
using kvf::control::Tier;
using nlohmann::json;
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

ChunkKey key_of(uint64_t n) {
  return ChunkKey{0x1111222233334444ull, n};
}
std::string hex_of(uint64_t n) {
  return key_of(n).to_hex();
}

// Answers from what it was asked, so a client can check that its reply belongs to its request;
// `fail` makes every operation return that status; a closed move gate holds /move until opened.
class FakeControlApi : public ControlApi {
 public:
  Result<LookupResult> lookup(const LookupRequest& request) override {
    std::lock_guard lock(mutex_);
    ++lookups;
    last_lookup = request;
    if (!fail.ok()) return fail;
    LookupResult result;
    if (request.by_tokens()) {
      result.query_chunks = static_cast<uint32_t>(request.tokens().size() / 256);
      if (!request.tokens().empty()) {
        result.matches.push_back(
            {"node-a", "prefill-0", request.tokens().size(), result.query_chunks, Tier::kGpu});
      }
    } else {
      result.query_chunks = static_cast<uint32_t>(request.chunk_keys().size());
      if (!request.chunk_keys().empty()) {
        result.matches.push_back(
            {"node-b", "", request.chunk_keys().size() * 256, result.query_chunks, Tier::kDram});
      }
    }
    return result;
  }
  Result<PinResult> pin(const PinRequest& request) override { return pin_or_unpin(request, true); }
  Result<PinResult> unpin(const PinRequest& request) override { return pin_or_unpin(request, false); }
  Result<ClearResult> clear(const ClearRequest& request) override {
    std::lock_guard lock(mutex_);
    last_clear = request;
    if (!fail.ok()) return fail;
    return ClearResult{request.scope == ClearRequest::Scope::kKeys ? request.keys.size() : 7, 7 * 4096};
  }
  Result<MoveResult> move(const MoveRequest& request) override {
    {
      std::unique_lock lock(mutex_);
      ++moves_started;
      cv_.notify_all();
      cv_.wait(lock, [&] { return move_gate_open; });
      last_move = request;
      if (!fail.ok()) return fail;
    }
    return MoveResult{request.keys.size(), request.keys.size() * 1000, {}};
  }
  Result<CompressResult> compress(const CompressRequest& request) override {
    std::lock_guard lock(mutex_);
    last_compress = request;
    if (!fail.ok()) return fail;
    return CompressResult{request.all ? 3 : request.keys.size(), 3000, 1500, {}, 0, 0, {}};
  }
  HealthReport health() override {
    std::lock_guard lock(mutex_);
    HealthReport report;
    report.healthy = healthy;
    report.node = "node-a";
    report.version = "0.1.0";
    report.uptime_s = 12.5;
    if (!healthy) report.problems.push_back("store arena not mapped");
    return report;
  }
  Result<ControlStats> stats() override {
    std::lock_guard lock(mutex_);
    if (!fail.ok()) return fail;
    ControlStats stats;
    stats.node = "node-a";
    stats.entries = 10;
    stats.pinned_entries = 2;
    stats.lookups = lookups;
    stats.tiers.push_back({Tier::kDram, 1 << 30, 1 << 20, 10, 5, 3, 1});
    return stats;
  }
  Result<std::string> metrics() override {
    std::lock_guard lock(mutex_);
    if (!fail.ok()) return fail;
    return std::string("# TYPE kvf_store_entries gauge\nkvf_store_entries 10\n");
  }

  void close_move_gate() {
    std::lock_guard lock(mutex_);
    move_gate_open = false;
  }
  void open_move_gate() {
    std::lock_guard lock(mutex_);
    move_gate_open = true;
    cv_.notify_all();
  }
  bool wait_moves_started(int n, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return moves_started >= n; });
  }
  void set_fail(Status status) {
    std::lock_guard lock(mutex_);
    fail = std::move(status);
  }
  void set_healthy(bool value) {
    std::lock_guard lock(mutex_);
    healthy = value;
  }
  template <typename T>
  T get(T FakeControlApi::*member) {
    std::lock_guard lock(mutex_);
    return this->*member;
  }

  LookupRequest last_lookup;
  PinRequest last_pin;
  PinRequest last_unpin;
  ClearRequest last_clear;
  MoveRequest last_move;
  CompressRequest last_compress;
  uint64_t lookups = 0;

 private:
  Result<PinResult> pin_or_unpin(const PinRequest& request, bool pin) {
    std::lock_guard lock(mutex_);
    (pin ? last_pin : last_unpin) = request;
    if (!fail.ok()) return fail;
    PinResult result;
    for (const auto& key : request.keys) {
      if (key.lo >= 1000) {
        result.not_found.push_back(key);
      } else {
        ++result.changed;
      }
    }
    return result;
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  Status fail;
  bool healthy = true;
  bool move_gate_open = true;
  int moves_started = 0;
};

struct Reply {
  unsigned status = 0;
  std::string body;
  std::string content_type;
  std::string allow;
  bool keep_alive = false;
  json doc;  // the body parsed, when it is JSON
};

// A synchronous HTTP/1.1 client on one connection. Every operation runs asynchronously on the
// client's own io_context for at most 10 s, so no check can hang the test (asio's blocking calls
// ignore SO_RCVTIMEO). Failures throw rather than assert: Catch2's macros are not thread-safe, and
// several tests drive clients from their own threads.
class Client {
 public:
  explicit Client(uint16_t port) : socket_(io_) {
    socket_.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  }

  void send(http::verb method, const std::string& target, const std::string& body = {},
            const std::string& content_type = "application/json", unsigned version = 11) {
    http::request<http::string_body> request{method, target, version};
    request.set(http::field::host, "127.0.0.1");
    if (!body.empty() && !content_type.empty()) request.set(http::field::content_type, content_type);
    request.body() = body;
    request.prepare_payload();
    const auto ec = run([&](auto done) { http::async_write(socket_, request, done); });
    if (ec) throw std::runtime_error("sending the request: " + ec.message());
  }

  Reply receive() {
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 << 20);
    const auto ec = run([&](auto done) { http::async_read(socket_, buffer_, parser, done); });
    if (ec) throw std::runtime_error("reading the reply: " + ec.message());
    const auto& response = parser.get();
    Reply reply;
    reply.status = response.result_int();
    reply.body = response.body();
    reply.content_type = std::string(response[http::field::content_type]);
    reply.allow = std::string(response[http::field::allow]);
    reply.keep_alive = response.keep_alive();
    if (reply.content_type == "application/json") reply.doc = json::parse(reply.body, nullptr, false);
    return reply;
  }

  Reply call(http::verb method, const std::string& target, const std::string& body = {},
             const std::string& content_type = "application/json") {
    send(method, target, body, content_type);
    return receive();
  }
  Reply post(const std::string& target, const json& body) {
    return call(http::verb::post, target, body.dump());
  }
  Reply post_raw(const std::string& target, const std::string& body) {
    return call(http::verb::post, target, body);
  }
  Reply get(const std::string& target) { return call(http::verb::get, target); }

  void write_raw(const std::string& bytes) {
    if (const auto ec = try_write_raw(bytes)) throw std::runtime_error("writing: " + ec.message());
  }
  // Best effort: a server that already refused the request may reset the connection under a
  // large write.
  void write_raw_ignoring_errors(const std::string& bytes) { try_write_raw(bytes); }

  // True when the server has closed: the next read ends (EOF or reset) within the timeout.
  bool closed_by_server() {
    if (buffer_.size() > 0) return false;
    char byte;
    const auto ec = run([&](auto done) { socket_.async_read_some(asio::buffer(&byte, 1), done); });
    return ec == asio::error::eof || ec == asio::error::connection_reset;
  }

 private:
  beast::error_code try_write_raw(const std::string& bytes) {
    return run([&](auto done) { asio::async_write(socket_, asio::buffer(bytes), done); });
  }

  // Starts an operation with a completion handler and runs it to completion or to the timeout
  // (then cancels it and reports timed_out).
  template <typename Start>
  beast::error_code run(Start start) {
    beast::error_code result;
    bool done = false;
    start([&](const beast::error_code& ec, size_t) {
      result = ec;
      done = true;
    });
    io_.restart();
    io_.run_for(10s);
    if (!done) {
      socket_.cancel();
      io_.restart();
      io_.run();
      return asio::error::timed_out;
    }
    return result;
  }

  asio::io_context io_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

struct TestServer {
  explicit TestServer(HttpServerOptions options = {}) : api(std::make_shared<FakeControlApi>()) {
    auto started = HttpControlServer::start(api, std::move(options));
    INFO(started.status().to_string());
    REQUIRE(started.ok());
    server = std::move(started).value();
  }
  uint16_t port() const { return server->port(); }

  std::shared_ptr<FakeControlApi> api;
  std::unique_ptr<HttpControlServer> server;
};

std::vector<uint32_t> tokens_of(size_t n, uint32_t seed = 0) {
  std::vector<uint32_t> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = static_cast<uint32_t>(i * 7919 + seed);
  return tokens;
}

uint64_t metric_value(const std::string& text, const std::string& series) {
  const auto at = text.find("\n" + series + " ");
  if (at == std::string::npos) return 0;
  return std::stoull(text.substr(at + series.size() + 2));
}

// The refusal carries the status, the error class and (when there is one) the offending field;
// the server still serves: the same connection when it was kept, else a new one.
void check_refusal(const Reply& reply, unsigned status, const std::string& code, const std::string& field) {
  INFO("reply " << reply.status << ": " << reply.body);
  CHECK(reply.status == status);
  REQUIRE(reply.content_type == "application/json");
  REQUIRE(reply.doc.is_object());
  CHECK(reply.doc.value("code", "") == code);
  CHECK(reply.doc.contains("error"));
  CHECK(!reply.doc.value("error", "").empty());
  REQUIRE(reply.doc.contains("field"));
  if (field.empty()) {
    CHECK(reply.doc["field"].is_null());
  } else {
    CHECK(reply.doc["field"] == field);
  }
}

}  // namespace

TEST_CASE("every route's happy path", "[http]") {
  TestServer ts;
  Client client(ts.port());

  SECTION("lookup by tokens") {
    const auto tokens = tokens_of(64 * 256 + 10);
    auto reply = client.post("/lookup", {{"model", "llama-8b"}, {"tokens", tokens}});
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.keep_alive);
    CHECK(reply.doc["model"] == "llama-8b");
    CHECK(reply.doc["query_chunks"] == 64);
    REQUIRE(reply.doc["matches"].size() == 1);
    const auto& m = reply.doc["matches"][0];
    CHECK(m["node"] == "node-a");
    CHECK(m["engine"] == "prefill-0");
    CHECK(m["matched_tokens"] == tokens.size());
    CHECK(m["matched_chunks"] == 64);
    CHECK(m["tier"] == "gpu");
    const auto seen = ts.api->get(&FakeControlApi::last_lookup);
    CHECK(seen.model == "llama-8b");
    REQUIRE(seen.by_tokens());
    CHECK(seen.tokens() == tokens);
  }
  SECTION("lookup by chunk keys, upper- and lower-case hex, token ids up to 2^32-1") {
    std::string upper = hex_of(2);
    std::transform(upper.begin(), upper.end(), upper.begin(),
                   [](char c) { return static_cast<char>(toupper(c)); });
    auto reply = client.post("/lookup", {{"model", "m"}, {"chunk_keys", {hex_of(1), upper, hex_of(3)}}});
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["query_chunks"] == 3);
    CHECK(reply.doc["matches"][0]["tier"] == "dram");
    CHECK(reply.doc["matches"][0]["engine"] == "");
    const auto seen = ts.api->get(&FakeControlApi::last_lookup);
    REQUIRE_FALSE(seen.by_tokens());
    CHECK(seen.chunk_keys() == std::vector<ChunkKey>{key_of(1), key_of(2), key_of(3)});

    reply = client.post("/lookup", {{"model", "m"}, {"tokens", {0, 4294967295u}}});
    REQUIRE(reply.status == 200);
    CHECK(ts.api->get(&FakeControlApi::last_lookup).tokens() == std::vector<uint32_t>{0, 4294967295u});
    CHECK(ts.api->get(&FakeControlApi::last_lookup).cluster);  // the default scope
  }
  SECTION("lookup scope: node or cluster") {
    auto reply = client.post("/lookup", {{"model", "m"}, {"tokens", {1}}, {"scope", "node"}});
    REQUIRE(reply.status == 200);
    CHECK_FALSE(ts.api->get(&FakeControlApi::last_lookup).cluster);
    reply = client.post("/lookup", {{"model", "m"}, {"chunk_keys", {hex_of(1)}}, {"scope", "cluster"}});
    REQUIRE(reply.status == 200);
    CHECK(ts.api->get(&FakeControlApi::last_lookup).cluster);
  }
  SECTION("an empty query is valid and matches nothing") {
    auto reply = client.post("/lookup", {{"model", "m"}, {"tokens", json::array()}});
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["matches"].empty());
  }
  SECTION("pin and unpin") {
    auto reply = client.post("/pin", {{"keys", {hex_of(1), hex_of(2), hex_of(1000)}}});
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["pinned"] == 2);
    CHECK(reply.doc["not_found"] == json::array({hex_of(1000)}));
    CHECK(ts.api->get(&FakeControlApi::last_pin).keys.size() == 3);

    reply = client.post("/unpin", {{"keys", {hex_of(5)}}});
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["unpinned"] == 1);
    CHECK(reply.doc["not_found"].empty());
    CHECK(ts.api->get(&FakeControlApi::last_unpin).keys == std::vector<ChunkKey>{key_of(5)});
  }
  SECTION("clear all, one model, some keys") {
    auto reply = client.post("/clear", {{"all", true}});
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["cleared"] == 7);
    CHECK(reply.doc["freed_bytes"] == 7 * 4096);
    CHECK(ts.api->get(&FakeControlApi::last_clear).scope == ClearRequest::Scope::kAll);

    reply = client.post("/clear", {{"model", "llama-8b"}});
    REQUIRE(reply.status == 200);
    auto seen = ts.api->get(&FakeControlApi::last_clear);
    CHECK(seen.scope == ClearRequest::Scope::kModel);
    CHECK(seen.model == "llama-8b");

    reply = client.post("/clear", {{"keys", {hex_of(1), hex_of(2)}}});
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["cleared"] == 2);
    seen = ts.api->get(&FakeControlApi::last_clear);
    CHECK(seen.scope == ClearRequest::Scope::kKeys);
    CHECK(seen.keys == std::vector<ChunkKey>{key_of(1), key_of(2)});
  }
  SECTION("move and copy") {
    auto reply =
        client.post("/move", {{"from", "node-a"}, {"to", "node-b"}, {"keys", {hex_of(1), hex_of(2)}}});
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["moved"] == 2);
    CHECK(reply.doc["bytes"] == 2000);
    CHECK(reply.doc["copy"] == false);
    auto seen = ts.api->get(&FakeControlApi::last_move);
    CHECK(seen.from == "node-a");
    CHECK(seen.to == "node-b");
    CHECK_FALSE(seen.copy);

    reply =
        client.post("/move", {{"from", "node-a"}, {"to", "node-c"}, {"keys", {hex_of(1)}}, {"copy", true}});
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["copy"] == true);
    CHECK(ts.api->get(&FakeControlApi::last_move).copy);
  }
  SECTION("compress keys or all") {
    auto reply = client.post("/compress", {{"keys", {hex_of(1)}}, {"codec", "identity"}});
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["codec"] == "identity");
    CHECK(reply.doc["compressed"] == 1);
    CHECK(reply.doc["bytes_before"] == 3000);
    CHECK(reply.doc["bytes_after"] == 1500);

    reply = client.post("/compress", {{"all", true}, {"codec", "identity"}});
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["compressed"] == 3);
    CHECK(ts.api->get(&FakeControlApi::last_compress).all);
  }
  SECTION("health: 200 when healthy, 503 with the problems when not") {
    auto reply = client.get("/health");
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["status"] == "ok");
    CHECK(reply.doc["node"] == "node-a");
    CHECK(reply.doc["uptime_s"] == 12.5);

    ts.api->set_healthy(false);
    reply = client.get("/health");
    REQUIRE(reply.status == 503);
    CHECK(reply.doc["status"] == "unhealthy");
    CHECK(reply.doc["problems"] == json::array({"store arena not mapped"}));
  }
  SECTION("stats") {
    auto reply = client.get("/stats");
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.doc["node"] == "node-a");
    CHECK(reply.doc["entries"] == 10);
    CHECK(reply.doc["pinned_entries"] == 2);
    REQUIRE(reply.doc["tiers"].size() == 1);
    CHECK(reply.doc["tiers"][0]["tier"] == "dram");
    CHECK(reply.doc["tiers"][0]["capacity_bytes"] == 1 << 30);
    CHECK(reply.doc["tiers"][0]["evictions"] == 1);
  }
  SECTION("metrics: the API's series and the server's own, as Prometheus text") {
    client.get("/health");
    client.call(http::verb::get, "/nowhere");
    auto reply = client.get("/metrics");
    INFO(reply.body);
    REQUIRE(reply.status == 200);
    CHECK(reply.content_type.rfind("text/plain; version=0.0.4", 0) == 0);
    CHECK(reply.body.find("kvf_store_entries 10\n") != std::string::npos);
    CHECK(reply.body.find("kvf_http_requests_total{route=\"/health\",code=\"200\"} 1\n") !=
          std::string::npos);
    CHECK(reply.body.find("kvf_http_requests_total{route=\"other\",code=\"404\"} 1\n") != std::string::npos);
    CHECK(metric_value(reply.body, "kvf_http_connections_open") == 1);
    CHECK(reply.body.back() == '\n');
  }
}

TEST_CASE("errors of the ControlApi map to status codes", "[http]") {
  TestServer ts;
  Client client(ts.port());
  const json lookup = {{"model", "m"}, {"tokens", {1, 2, 3}}};
  struct Case {
    ErrorCode code;
    unsigned status;
    const char* name;
  };
  for (const Case& c :
       {Case{ErrorCode::kNotFound, 404, "not_found"},
        Case{ErrorCode::kInvalidArgument, 400, "invalid_argument"},
        Case{ErrorCode::kUnavailable, 503, "unavailable"}, Case{ErrorCode::kInternal, 500, "internal"},
        Case{ErrorCode::kTimeout, 500, "timeout"}}) {
    ts.api->set_fail(Status(c.code, "the store said no"));
    for (const char* route : {"/lookup", "/move", "/stats"}) {
      Reply reply;
      if (std::string(route) == "/lookup") reply = client.post(route, lookup);
      if (std::string(route) == "/move")
        reply = client.post(route, {{"from", "a"}, {"to", "b"}, {"keys", json::array()}});
      if (std::string(route) == "/stats") reply = client.get(route);
      INFO(route << " " << reply.body);
      CHECK(reply.status == c.status);
      CHECK(reply.doc["code"] == c.name);
      CHECK(reply.doc["error"] == "the store said no");
      CHECK(reply.doc["field"].is_null());
      CHECK(reply.keep_alive);
    }
  }
  ts.api->set_fail(Status::Ok());
  CHECK(client.post("/lookup", lookup).status == 200);
}

TEST_CASE("bad request bodies get a 4xx naming the problem; the connection keeps serving", "[http]") {
  TestServer ts;
  Client client(ts.port());
  const std::string key = hex_of(1);
  struct Case {
    const char* route;
    std::string body;
    unsigned status;
    const char* code;
    const char* field;
  };
  const std::vector<Case> cases = {
      // malformed JSON
      {"/lookup", "", 400, "malformed_json", ""},
      {"/lookup", "{", 400, "malformed_json", ""},
      {"/lookup", "{\"model\": \"m\", \"tokens\": [1, 2", 400, "malformed_json", ""},
      {"/lookup", "{'model': 'm'}", 400, "malformed_json", ""},
      {"/lookup", "nul", 400, "malformed_json", ""},
      {"/lookup", "{\"model\": \"m\", \"tokens\": [1]} trailing", 400, "malformed_json", ""},
      {"/lookup", "{\"model\": \"\xff\xfe\", \"tokens\": [1]}", 400, "malformed_json", ""},
      {"/pin", std::string("{\"keys\": [\"a\0b\"]}", 17), 400, "malformed_json", ""},
      // the body is not an object
      {"/lookup", "[1, 2, 3]", 400, "wrong_type", ""},
      {"/pin", "\"keys\"", 400, "wrong_type", ""},
      // unknown and duplicate fields
      {"/lookup", R"({"model": "m", "tokens": [1], "extra": 1})", 400, "unknown_field", "extra"},
      {"/lookup", R"({"modle": "m", "tokens": [1]})", 400, "unknown_field", "modle"},
      {"/pin", R"({"keys": [], "ttl": 5})", 400, "unknown_field", "ttl"},
      {"/move", R"({"from": "a", "to": "b", "keys": [], "cpy": true})", 400, "unknown_field", "cpy"},
      {"/lookup", R"({"model": "m", "model": "n", "tokens": [1]})", 400, "duplicate_field", "model"},
      // wrong types
      {"/lookup", R"({"model": 5, "tokens": [1]})", 400, "wrong_type", "model"},
      {"/lookup", R"({"model": null, "tokens": [1]})", 400, "wrong_type", "model"},
      {"/lookup", R"({"model": "m", "tokens": "1 2 3"})", 400, "wrong_type", "tokens"},
      {"/lookup", R"({"model": "m", "tokens": [1, "2"]})", 400, "wrong_type", "tokens[1]"},
      {"/lookup", R"({"model": "m", "tokens": [1, 2.5]})", 400, "wrong_type", "tokens[1]"},
      {"/lookup", R"({"model": "m", "tokens": [1e3]})", 400, "wrong_type", "tokens[0]"},
      {"/lookup", R"({"model": "m", "tokens": [true]})", 400, "wrong_type", "tokens[0]"},
      {"/lookup", R"({"model": "m", "tokens": [[1]]})", 400, "wrong_type", "tokens[0]"},
      {"/lookup", R"({"model": "m", "chunk_keys": "abc"})", 400, "wrong_type", "chunk_keys"},
      {"/pin", R"({"keys": [1]})", 400, "wrong_type", "keys[0]"},
      {"/pin", R"({"keys": {"a": 1}})", 400, "wrong_type", "keys"},
      {"/move", R"({"from": "a", "to": "b", "keys": [], "copy": "yes"})", 400, "wrong_type", "copy"},
      {"/clear", R"({"all": 1})", 400, "wrong_type", "all"},
      {"/compress", R"({"all": true, "codec": 3})", 400, "wrong_type", "codec"},
      // missing required fields
      {"/lookup", R"({"tokens": [1]})", 400, "missing_field", "model"},
      {"/lookup", R"({"model": "m"})", 400, "missing_field", "tokens"},
      {"/pin", R"({})", 400, "missing_field", "keys"},
      {"/unpin", R"({})", 400, "missing_field", "keys"},
      {"/clear", R"({})", 400, "missing_field", "all"},
      {"/move", R"({"from": "a", "keys": []})", 400, "missing_field", "to"},
      {"/move", R"({"to": "a", "keys": []})", 400, "missing_field", "from"},
      {"/move", R"({"from": "a", "to": "b"})", 400, "missing_field", "keys"},
      {"/compress", R"({"all": true})", 400, "missing_field", "codec"},
      {"/compress", R"({"codec": "identity"})", 400, "missing_field", "keys"},
      // values out of range or malformed
      {"/lookup", R"({"model": "m", "tokens": [1, -1]})", 400, "invalid_value", "tokens[1]"},
      {"/lookup", R"({"model": "m", "tokens": [4294967296]})", 400, "invalid_value", "tokens[0]"},
      {"/lookup", R"({"model": "m", "tokens": [18446744073709551616]})", 400, "wrong_type", "tokens[0]"},
      {"/lookup", R"({"model": "", "tokens": [1]})", 400, "invalid_value", "model"},
      {"/lookup", R"({"model": "m", "tokens": [1], "scope": "everywhere"})", 400, "invalid_value", "scope"},
      {"/lookup", R"({"model": "m", "tokens": [1], "scope": 1})", 400, "wrong_type", "scope"},
      {"/lookup", "{\"model\": \"" + std::string(300, 'm') + "\", \"tokens\": [1]}", 400, "invalid_value",
       "model"},
      {"/lookup", R"({"model": "m", "chunk_keys": ["0123456789abcdef0123456789abcde"]})", 400,
       "invalid_value", "chunk_keys[0]"},
      {"/pin", "{\"keys\": [\"" + key + "\", \"" + key + "0\"]}", 400, "invalid_value", "keys[1]"},
      {"/pin", R"({"keys": ["0123456789abcdef0123456789abcdeg"]})", 400, "invalid_value", "keys[0]"},
      {"/pin", R"({"keys": [" 123456789abcdef0123456789abcdef"]})", 400, "invalid_value", "keys[0]"},
      {"/move", R"({"from": "a", "to": "a", "keys": []})", 400, "invalid_value", "to"},
      {"/clear", R"({"all": false})", 400, "invalid_value", "all"},
      {"/compress", R"({"all": false, "codec": "identity"})", 400, "invalid_value", "all"},
      // conflicting fields
      {"/lookup", "{\"model\": \"m\", \"tokens\": [1], \"chunk_keys\": [\"" + key + "\"]}", 400,
       "conflicting_fields", "chunk_keys"},
      {"/clear", R"({"all": true, "model": "m"})", 400, "conflicting_fields", "model"},
      {"/compress", "{\"all\": true, \"keys\": [\"" + key + "\"], \"codec\": \"identity\"}", 400,
       "conflicting_fields", "all"},
  };
  for (const auto& c : cases) {
    INFO("POST " << c.route << " " << c.body);
    const auto reply = client.post_raw(c.route, c.body);
    check_refusal(reply, c.status, c.code, c.field);
    CHECK(reply.keep_alive);
    // The same connection still serves.
    CHECK(client.get("/health").status == 200);
  }
  CHECK(ts.api->get(&FakeControlApi::lookups) == 0);  // nothing invalid reached the API
  SECTION("a typo gets a suggestion") {
    const auto reply = client.post_raw("/lookup", R"({"modle": "m", "tokens": [1]})");
    CHECK(reply.doc["error"].get<std::string>().find("did you mean 'model'?") != std::string::npos);
  }
  SECTION("the refused value's position is named in the message") {
    const auto reply = client.post_raw("/lookup", R"({"model": "m", "tokens": [1, 2, -7]})");
    CHECK(reply.doc["error"].get<std::string>().find("tokens[2]") != std::string::npos);
    CHECK(reply.doc["error"].get<std::string>().find("-7") != std::string::npos);
  }
}

TEST_CASE("routes, methods, media types and query strings are checked", "[http]") {
  TestServer ts;
  Client client(ts.port());
  const std::string lookup = R"({"model": "m", "tokens": [1]})";
  SECTION("unknown routes: 404") {
    for (const char* target : {"/", "/nope", "/lookup/", "/LOOKUP", "/metrics/x", "//lookup"}) {
      INFO(target);
      check_refusal(client.call(http::verb::get, target), 404, "unknown_route", "");
      check_refusal(client.call(http::verb::post, target, lookup), 404, "unknown_route", "");
    }
  }
  SECTION("wrong methods: 405 with Allow") {
    auto reply = client.get("/lookup");
    check_refusal(reply, 405, "method_not_allowed", "");
    CHECK(reply.allow == "POST");
    reply = client.call(http::verb::post, "/health", "{}");
    check_refusal(reply, 405, "method_not_allowed", "");
    CHECK(reply.allow == "GET");
    check_refusal(client.call(http::verb::delete_, "/pin"), 405, "method_not_allowed", "");
    check_refusal(client.call(http::verb::put, "/metrics"), 405, "method_not_allowed", "");
  }
  SECTION("a body that is not JSON by its Content-Type: 415; none given: taken as JSON") {
    check_refusal(client.call(http::verb::post, "/lookup", lookup, "text/plain"), 415,
                  "unsupported_media_type", "Content-Type");
    check_refusal(client.call(http::verb::post, "/lookup", lookup, "application/x-www-form-urlencoded"), 415,
                  "unsupported_media_type", "Content-Type");
    CHECK(client.call(http::verb::post, "/lookup", lookup, "Application/JSON; charset=utf-8").status == 200);
    CHECK(client.call(http::verb::post, "/lookup", lookup, "").status == 200);
  }
  SECTION("query parameters: 400") {
    check_refusal(client.call(http::verb::post, "/lookup?model=m", lookup), 400, "unknown_field", "query");
    check_refusal(client.get("/stats?x=1"), 400, "unknown_field", "query");
  }
  CHECK(client.get("/health").status == 200);
}

TEST_CASE("oversized bodies and heads are refused before they are read", "[http]") {
  SECTION("the default limit is 1 MiB: 413, then the connection closes") {
    TestServer ts;
    Client client(ts.port());
    // Exactly at the limit is accepted (a valid body padded with spaces).
    std::string body = R"({"model": "m", "tokens": [1]})";
    body.resize(1 << 20, ' ');
    CHECK(client.post_raw("/lookup", body).status == 200);

    body.resize((1 << 20) + 1, ' ');
    const auto reply = client.post_raw("/lookup", body);
    check_refusal(reply, 413, "body_too_large", "");
    CHECK_FALSE(reply.keep_alive);
    CHECK(client.closed_by_server());
    Client next(ts.port());
    CHECK(next.get("/health").status == 200);
  }
  SECTION("a configured limit; a chunked body over it") {
    HttpServerOptions options;
    options.max_body_bytes = 4096;
    TestServer ts(options);
    Client client(ts.port());
    const std::string chunk(3000, ' ');
    client.write_raw("POST /lookup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    char size_line[32];
    std::snprintf(size_line, sizeof size_line, "%zx\r\n", chunk.size());
    client.write_raw_ignoring_errors(std::string(size_line) + chunk + "\r\n" + size_line + chunk +
                                     "\r\n0\r\n\r\n");
    check_refusal(client.receive(), 413, "body_too_large", "");
    CHECK(client.closed_by_server());
    Client next(ts.port());
    CHECK(next.post_raw("/lookup", R"({"model": "m", "tokens": [1]})").status == 200);
  }
  SECTION("a declared length over the limit is refused at the head (Expect: 100-continue)") {
    HttpServerOptions options;
    options.max_body_bytes = 4096;
    TestServer ts(options);
    Client client(ts.port());
    client.write_raw(
        "POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n");
    check_refusal(client.receive(), 413, "body_too_large", "");
    CHECK(client.closed_by_server());
  }
  SECTION("a head over the limit: 431") {
    TestServer ts;
    Client client(ts.port());
    client.write_raw_ignoring_errors(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(32 << 10, 'a') + "\r\n\r\n");
    check_refusal(client.receive(), 431, "headers_too_large", "");
    CHECK(client.closed_by_server());
    Client next(ts.port());
    CHECK(next.get("/health").status == 200);
  }
}

TEST_CASE("Expect: 100-continue under the limit gets 100 Continue, then the reply", "[http]") {
  TestServer ts;
  Client client(ts.port());
  const std::string body = R"({"model": "m", "tokens": [1, 2]})";
  client.write_raw("POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                   std::to_string(body.size()) + "\r\nExpect: 100-continue\r\n\r\n");
  const auto interim = client.receive();
  CHECK(interim.status == 100);
  client.write_raw(body);
  const auto reply = client.receive();
  CHECK(reply.status == 200);
  CHECK(client.get("/health").status == 200);
}

TEST_CASE("garbage on the wire: 400 and close; other connections are untouched", "[http]") {
  TestServer ts;
  Client bystander(ts.port());
  CHECK(bystander.get("/health").status == 200);

  for (const std::string& garbage :
       {std::string("\x16\x03\x01\x02\x00\x01", 6) + "tls hello\r\n\r\n", std::string("HELLO WORLD\r\n\r\n"),
        std::string("GET /health HTTX/1.1\r\n\r\n"),
        std::string("GET /health HTTP/1.1\r\nContent-Length: abc\r\n\r\n"),
        std::string("POST /lookup HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
        std::string("GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n"), std::string(4096, '\0')}) {
    INFO("garbage: " << json(garbage).dump(-1, ' ', false, json::error_handler_t::replace));
    Client client(ts.port());
    client.write_raw_ignoring_errors(garbage);
    const auto reply = client.receive();
    check_refusal(reply, 400, "malformed_http", "");
    CHECK_FALSE(reply.keep_alive);
    CHECK(client.closed_by_server());
    CHECK(bystander.get("/health").status == 200);
  }
  SECTION("peers that leave mid-request are dropped quietly") {
    for (const char* partial :
         {"GET /hea", "POST /lookup HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"model\""}) {
      Client client(ts.port());
      client.write_raw(partial);
    }  // closed here
    CHECK(bystander.get("/health").status == 200);
  }
  SECTION("a valid request after garbage on a fresh connection") {
    Client client(ts.port());
    CHECK(client.post("/lookup", {{"model", "m"}, {"tokens", {1}}}).status == 200);
  }
}

TEST_CASE("keep-alive: one connection serves many requests; pipelined ones are answered in order", "[http]") {
  TestServer ts;
  Client probe(ts.port());
  const auto before = metric_value(probe.get("/metrics").body, "kvf_http_connections_accepted_total");
  {
    Client client(ts.port());
    for (int i = 0; i < 200; ++i) {
      const auto tokens = tokens_of(static_cast<size_t>(256 * (i % 5)), static_cast<uint32_t>(i));
      const auto reply = client.post("/lookup", {{"model", "m"}, {"tokens", tokens}});
      REQUIRE(reply.status == 200);
      REQUIRE(reply.keep_alive);
      REQUIRE(reply.doc["query_chunks"] == i % 5);
    }
    // Three requests in one write.
    const std::string body = R"({"keys": [")" + hex_of(1) + R"("]})";
    std::string batch;
    for (const char* route : {"/pin", "/health", "/unpin"}) {
      const bool post = std::string(route) != "/health";
      batch += std::string(post ? "POST " : "GET ") + route + " HTTP/1.1\r\nHost: x\r\n";
      batch += post ? "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body : "\r\n";
    }
    client.write_raw(batch);
    CHECK(client.receive().doc.contains("pinned"));
    CHECK(client.receive().doc["status"] == "ok");
    CHECK(client.receive().doc.contains("unpinned"));
  }
  const auto after = metric_value(probe.get("/metrics").body, "kvf_http_connections_accepted_total");
  CHECK(after - before == 1);
}

TEST_CASE("Connection: close and HTTP/1.0 end the connection after the reply", "[http]") {
  TestServer ts;
  {
    Client client(ts.port());
    client.write_raw("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    const auto reply = client.receive();
    CHECK(reply.status == 200);
    CHECK_FALSE(reply.keep_alive);
    CHECK(client.closed_by_server());
  }
  {
    Client client(ts.port());
    client.send(http::verb::get, "/health", {}, {}, 10);
    const auto reply = client.receive();
    CHECK(reply.status == 200);
    CHECK(client.closed_by_server());
  }
}

TEST_CASE("idle and stalled connections are closed after their timeouts", "[http]") {
  HttpServerOptions options;
  options.idle_timeout = 300ms;
  options.body_timeout = 300ms;
  TestServer ts(options);
  {
    Client idle(ts.port());
    CHECK(idle.get("/health").status == 200);
    const auto start = std::chrono::steady_clock::now();
    CHECK(idle.closed_by_server());
    CHECK(std::chrono::steady_clock::now() - start < 5s);
  }
  {
    Client stalled(ts.port());
    stalled.write_raw("POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"model\"");
    CHECK(stalled.closed_by_server());
  }
  Client client(ts.port());
  CHECK(client.get("/health").status == 200);
}

TEST_CASE("concurrent clients each get their own answers", "[http]") {
  HttpServerOptions options;
  options.io_threads = 2;
  TestServer ts(options);
  constexpr int kClients = 8;
  constexpr int kRequests = 150;
  std::atomic<int> wrong{0};
  std::atomic<int> served{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      try {
        Client client(ts.port());
        for (int i = 0; i < kRequests; ++i) {
          // Every few requests a bad one, so refusals interleave with answers.
          if (i % 10 == 3) {
            const auto reply = client.post_raw("/lookup", R"({"model": "m", "tokens": [-1]})");
            if (reply.status != 400) ++wrong;
            continue;
          }
          const size_t n = static_cast<size_t>(1 + c * 1000 + i);
          const auto reply = client.post("/lookup", {{"model", "m"}, {"tokens", tokens_of(n)}});
          if (reply.status != 200 || reply.doc["matches"][0]["matched_tokens"] != n) ++wrong;
          ++served;
        }
      } catch (const std::exception&) {
        ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(wrong.load() == 0);
  CHECK(served.load() == kClients * (kRequests - kRequests / 10));
}

TEST_CASE("a slow move does not hold up lookups or health", "[http]") {
  TestServer ts;  // one io thread: the move must run elsewhere
  ts.api->close_move_gate();
  Reply moved;
  std::thread mover([&] {
    try {
      Client client(ts.port());
      moved = client.post("/move", {{"from", "a"}, {"to", "b"}, {"keys", {hex_of(1)}}});
    } catch (const std::exception& e) {
      moved.body = e.what();
    }
  });
  REQUIRE(ts.api->wait_moves_started(1, 10s));
  // The move is held inside the API now; these must still be answered.
  Client client(ts.port());
  CHECK(client.get("/health").status == 200);
  CHECK(client.post("/lookup", {{"model", "m"}, {"tokens", {1}}}).status == 200);
  ts.api->open_move_gate();
  mover.join();
  INFO(moved.body);
  CHECK(moved.status == 200);
  CHECK(moved.doc["moved"] == 1);
}

TEST_CASE("stopping the server closes its connections and waits for running operations", "[http]") {
  TestServer ts;
  ts.api->close_move_gate();
  Client idle(ts.port());
  CHECK(idle.get("/health").status == 200);
  std::thread mover([&] {
    try {
      Client client(ts.port());
      client.send(http::verb::post, "/move",
                  json{{"from", "a"}, {"to", "b"}, {"keys", json::array()}}.dump());
    } catch (const std::exception&) {
      // wait_moves_started below reports it
    }
  });
  REQUIRE(ts.api->wait_moves_started(1, 10s));
  std::thread opener([&] {
    std::this_thread::sleep_for(200ms);
    ts.api->open_move_gate();
  });
  const auto start = std::chrono::steady_clock::now();
  ts.server->stop();
  CHECK(std::chrono::steady_clock::now() - start >= 150ms);  // it waited for the move
  CHECK(idle.closed_by_server());
  opener.join();
  mover.join();
  ts.server->stop();  // idempotent
}

TEST_CASE("start refuses bad options and a taken port", "[http]") {
  auto api = std::make_shared<FakeControlApi>();
  HttpServerOptions options;
  options.io_threads = 0;
  CHECK(HttpControlServer::start(api, options).status().code() == ErrorCode::kInvalidArgument);
  CHECK(HttpControlServer::start(nullptr).status().code() == ErrorCode::kInvalidArgument);

  auto first = HttpControlServer::start(api);
  REQUIRE(first.ok());
  HttpServerOptions same;
  same.port = first.value()->port();
  const auto second = HttpControlServer::start(api, same);
  CHECK(second.status().code() == ErrorCode::kTransportError);
  CHECK(second.status().message().find("bind") != std::string::npos);
}

namespace {

bool same_lookup(const LookupRequest& a, const LookupRequest& b) {
  return a.model == b.model && a.query == b.query && a.cluster == b.cluster;
}

template <typename T, typename Same>
void check_paths_agree(const std::string& body, const kvf::control::Checked<T>& both,
                       const kvf::control::Checked<T>& full, Same same) {
  INFO("body: " << json(body).dump(-1, ' ', false, json::error_handler_t::replace));
  REQUIRE(both.ok() == full.ok());
  if (full.ok()) {
    CHECK(same(const_cast<kvf::control::Checked<T>&>(both).value(),
               const_cast<kvf::control::Checked<T>&>(full).value()));
  } else {
    CHECK(both.error().code == full.error().code);
    CHECK(both.error().field == full.error().field);
    CHECK(both.error().message == full.error().message);
  }
}

}  // namespace

TEST_CASE("the fast path for common bodies reads exactly what the full parser reads", "[http]") {
  const std::string k1 = hex_of(1), k2 = "ABCDEF0123456789abcdef0123456789";
  const std::vector<std::string> lookups = {
      R"({"model":"m","tokens":[0,1,4294967295]})",
      " \t\r\n{ \"tokens\" : [ 5 , 6 ] , \"model\" : \"llama-3-8b\" } \n",
      R"({"model":"m","tokens":[]})",
      R"({"model":"m","chunk_keys":[]})",
      "{\"model\":\"m\",\"chunk_keys\":[\"" + k1 + "\",\"" + k2 + "\"]}",
      R"({"chunk_keys":["00000000000000000000000000000000"],"model":"a b~c"})",
  };
  const std::vector<std::string> pins = {
      "{\"keys\":[\"" + k1 + "\"]}",
      R"({"keys":[]})",
      "{ \"keys\" : [ \"" + k2 + "\" , \"" + k1 + "\" ] }",
  };
  auto same_pin = [](const PinRequest& a, const PinRequest& b) { return a.keys == b.keys; };
  for (const auto& body : lookups) {
    const auto both = kvf::control::decode_lookup(body);
    REQUIRE(both.ok());
    check_paths_agree(body, both, kvf::control::decode_lookup_full(body), same_lookup);
  }
  for (const auto& body : pins) {
    const auto both = kvf::control::decode_pin(body);
    REQUIRE(both.ok());
    check_paths_agree(body, both, kvf::control::decode_pin_full(body), same_pin);
  }

  // Random edits of those bodies: whatever either path makes of them, both make the same.
  const std::string alphabet =
      std::string("{}[]\",:0123456789-+.eE truefalsnul\\/abu\t\n\r") + '\0' + "\xff\xc3";
  std::mt19937 rng(20261129);
  auto pick = [&](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  int accepted = 0;
  for (int round = 0; round < 4000; ++round) {
    const bool lookup = round % 2 == 0;
    std::string body = lookup ? lookups[pick(lookups.size())] : pins[pick(pins.size())];
    for (size_t edits = 1 + pick(3); edits > 0; --edits) {
      const size_t at = pick(body.size() + 1);
      switch (pick(4)) {
        case 0:
          if (at < body.size()) body.erase(at, 1);
          break;
        case 1:
          body.insert(at, 1, alphabet[pick(alphabet.size())]);
          break;
        case 2:
          if (at < body.size()) body[at] = alphabet[pick(alphabet.size())];
          break;
        default:
          body.insert(at, body.substr(pick(body.size()), 1 + pick(8)));
          break;
      }
    }
    if (lookup) {
      const auto both = kvf::control::decode_lookup(body);
      accepted += both.ok() ? 1 : 0;
      check_paths_agree(body, both, kvf::control::decode_lookup_full(body), same_lookup);
    } else {
      const auto both = kvf::control::decode_pin(body);
      accepted += both.ok() ? 1 : 0;
      check_paths_agree(body, both, kvf::control::decode_pin_full(body), same_pin);
    }
  }
  CHECK(accepted > 100);  // the edits keep a fair share of bodies valid, so acceptance is compared too
}

TEST_CASE("the hand-written lookup reply is what the JSON library would write", "[http]") {
  for (const std::string& name : {std::string("node-a"), std::string(""), std::string("quote\" back\\slash"),
                                  std::string("tab\tnl\n\x01"), std::string("caf\xc3\xa9 \xe2\x82\xac"),
                                  std::string("bad \xff\xfe utf-8"), std::string("del\x7f")}) {
    LookupRequest request;
    request.model = name;
    LookupResult result;
    result.query_chunks = 64;
    result.matches.push_back({name, "engine-" + name, 16384, 64, Tier::kGpu});
    result.matches.push_back({"n2", "", 0, 0, Tier::kSsd});
    const json reference = {
        {"model", name},
        {"query_chunks", 64},
        {"matches",
         {{{"node", name},
           {"engine", "engine-" + name},
           {"matched_tokens", 16384},
           {"matched_chunks", 64},
           {"tier", "gpu"}},
          {{"node", "n2"}, {"engine", ""}, {"matched_tokens", 0}, {"matched_chunks", 0}, {"tier", "ssd"}}}}};
    INFO(json(name).dump(-1, ' ', false, json::error_handler_t::replace));
    CHECK(kvf::control::render_lookup(request, result) ==
          reference.dump(-1, ' ', false, json::error_handler_t::replace));
  }
  LookupRequest request;
  request.model = "m";
  CHECK(kvf::control::render_lookup(request, LookupResult{}) ==
        R"({"matches":[],"model":"m","query_chunks":0})");
}
