#include "engine_service.h"

#include <sys/socket.h>

#include <spdlog/spdlog.h>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "block_manager.h"
#include "kvf/engines/engine_model.h"
#include "kvf/engines/kv_connector.h"
#include "kvf/engines/synthetic_prompt.h"
#include "request_context.h"

namespace kvf::engines {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kMaxBodyBytes = 64ull << 20;  // a prompt of millions of token ids still fits
constexpr std::chrono::seconds kUnclaimedKvTimeout{300};

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

struct Reply {
  http::status status = http::status::ok;
  json body;
};

Reply error(http::status status, const std::string& message) {
  return {status, json{{"error", message}}};
}

Reply from_status(const Status& s, const std::string& what) {
  http::status code = http::status::internal_server_error;
  switch (s.code()) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kMalformed:
      code = http::status::bad_request;
      break;
    case ErrorCode::kNotFound:
      code = http::status::not_found;
      break;
    case ErrorCode::kUnavailable:
    case ErrorCode::kOutOfMemory:
      code = http::status::service_unavailable;
      break;
    case ErrorCode::kTimeout:
      code = http::status::gateway_timeout;
      break;
    case ErrorCode::kPeerLost:
    case ErrorCode::kTransportError:
    case ErrorCode::kAborted:
      code = http::status::bad_gateway;
      break;
    default:
      break;
  }
  return error(code, what + ": " + s.to_string());
}

// A JSON body's fields, checked: every field known to the route, each of the right type.
class Fields {
 public:
  static Result<Fields> parse(const std::string& body, std::set<std::string> allowed) {
    json j = json::parse(body, nullptr, false);
    if (j.is_discarded()) return Status(ErrorCode::kMalformed, "the body is not valid JSON");
    if (!j.is_object()) return Status(ErrorCode::kMalformed, "the body must be a JSON object");
    for (const auto& item : j.items()) {
      if (allowed.count(item.key()) == 0) {
        std::string known;
        for (const std::string& a : allowed) known += (known.empty() ? "" : ", ") + a;
        return Status(ErrorCode::kInvalidArgument,
                      "unknown field '" + item.key() + "' (known: " + known + ")");
      }
    }
    return Fields(std::move(j));
  }
  bool has(const char* name) const { return j_.contains(name); }
  Result<uint64_t> u64(const char* name, std::optional<uint64_t> fallback = std::nullopt) const {
    if (!j_.contains(name)) {
      if (fallback) return *fallback;
      return Status(ErrorCode::kInvalidArgument, std::string("field '") + name + "' is required");
    }
    if (!j_[name].is_number_unsigned())
      return Status(ErrorCode::kInvalidArgument,
                    std::string("field '") + name + "' must be an unsigned integer");
    return j_[name].get<uint64_t>();
  }
  Result<bool> boolean(const char* name, bool fallback) const {
    if (!j_.contains(name)) return fallback;
    if (!j_[name].is_boolean())
      return Status(ErrorCode::kInvalidArgument, std::string("field '") + name + "' must be true or false");
    return j_[name].get<bool>();
  }
  Result<std::string> text(const char* name) const {
    if (!j_.contains(name) || !j_[name].is_string())
      return Status(ErrorCode::kInvalidArgument, std::string("field '") + name + "' must be a string");
    return j_[name].get<std::string>();
  }
  // "prompt": [token ids], or "prompt_tokens": N with an optional "prompt_seed" (a seeded prompt).
  Result<std::vector<uint32_t>> prompt(uint32_t vocab) const {
    if (j_.contains("prompt") == j_.contains("prompt_tokens"))
      return Status(ErrorCode::kInvalidArgument,
                    "give either 'prompt' (token ids) or 'prompt_tokens' (a length)");
    if (j_.contains("prompt")) {
      const json& p = j_["prompt"];
      if (!p.is_array() || p.empty())
        return Status(ErrorCode::kInvalidArgument, "field 'prompt' must be a non-empty array of token ids");
      std::vector<uint32_t> out;
      for (const json& t : p) {
        if (!t.is_number_unsigned() || t.get<uint64_t>() >= vocab)
          return Status(ErrorCode::kInvalidArgument, "prompt token " + t.dump() +
                                                         " is not a token id below the vocab size " +
                                                         std::to_string(vocab));
        out.push_back(static_cast<uint32_t>(t.get<uint64_t>()));
      }
      return out;
    }
    auto n = u64("prompt_tokens");
    if (!n.ok()) return n.status();
    if (n.value() == 0 || n.value() > (1u << 20))
      return Status(ErrorCode::kInvalidArgument, "field 'prompt_tokens' must be 1 .. 1048576");
    auto seed = u64("prompt_seed", 7);
    if (!seed.ok()) return seed.status();
    return synthetic_prompt(static_cast<uint32_t>(n.value()), vocab, seed.value());
  }

 private:
  explicit Fields(json j) : j_(std::move(j)) {}
  json j_;
};

class Service {
 public:
  Service(const EngineServiceOptions& options, EngineModel& model, KvPool& pool, BlockManager& blocks,
          KvConnector& connector)
      : o_(options), model_(model), pool_(pool), blocks_(blocks), c_(connector) {
    if (o_.role != "prefill") poller_ = std::thread([this] { poll_received(); });
  }
  ~Service() {
    stopping_ = true;
    if (poller_.joinable()) poller_.join();
  }

  Reply handle(const http::request<http::string_body>& req) {
    const std::string target(req.target());
    const bool post = req.method() == http::verb::post;
    if (target == "/health") {
      if (req.method() != http::verb::get)
        return error(http::status::method_not_allowed, "/health takes GET");
      return health();
    }
    if (target != "/generate" && target != "/prefill" && target != "/decode")
      return error(http::status::not_found,
                   "no route " + target + " (routes: /health, /generate, /prefill, /decode)");
    if (!post) return error(http::status::method_not_allowed, target + " takes POST");
    if (target == "/generate") return generate(req.body());
    if (target == "/prefill") {
      if (o_.role == "decode")
        return error(http::status::bad_request, "this is a decode engine: /prefill is refused");
      return prefill(req.body());
    }
    if (o_.role == "prefill")
      return error(http::status::bad_request, "this is a prefill engine: /decode is refused");
    return decode(req.body());
  }

 private:
  Reply health() {
    json j{{"engine", o_.name},
           {"role", o_.role},
           {"model", o_.model_name},
           {"shape", model_.shape().to_string()},
           {"device", model_.device() < 0 ? std::string("cpu") : "cuda:" + std::to_string(model_.device())},
           {"free_blocks", blocks_.free_blocks()}};
    if (c_.listen_port() != 0) j["kv_port"] = c_.listen_port();
    return {http::status::ok, j};
  }

  // Blocks for positions [0, prompt + n_new - 1): the prompt and what decoding appends.
  Result<std::vector<uint32_t>> take_blocks(size_t prompt, uint32_t n_new) {
    const uint64_t positions = prompt + n_new - 1;
    const uint64_t n = (positions + model_.shape().block_tokens - 1) / model_.shape().block_tokens;
    std::vector<uint32_t> table =
        n <= UINT32_MAX ? blocks_.allocate(static_cast<uint32_t>(n)) : std::vector<uint32_t>{};
    if (table.empty())
      return Status(ErrorCode::kUnavailable, "the KV pool has " + std::to_string(blocks_.free_blocks()) +
                                                 " free blocks, the request needs " + std::to_string(n));
    return table;
  }

  Reply generate(const std::string& body) {
    auto f = Fields::parse(body, {"prompt", "prompt_tokens", "prompt_seed", "n_new"});
    if (!f.ok()) return from_status(f.status(), "/generate");
    auto prompt = f->prompt(model_.shape().vocab);
    auto n_new = f->u64("n_new", 16);
    if (!prompt.ok()) return from_status(prompt.status(), "/generate");
    if (!n_new.ok() || n_new.value() == 0 || n_new.value() > 65536)
      return error(http::status::bad_request, "/generate: 'n_new' must be 1 .. 65536");
    std::lock_guard lock(model_mutex_);
    auto table = take_blocks(prompt->size(), static_cast<uint32_t>(n_new.value()));
    if (!table.ok()) return from_status(table.status(), "/generate");
    const auto started = Clock::now();
    std::vector<uint32_t> tokens;
    auto first = model_.prefill_from(0, prompt.value(), table.value(), pool_.view());
    const double ttft = ms_since(started);
    Status status = first.ok() ? Status::Ok() : first.status();
    if (first.ok()) tokens.push_back(first.value());
    for (uint32_t i = 1; status.ok() && i < n_new.value(); ++i) {
      auto next = model_.decode_step(static_cast<uint32_t>(prompt->size() + i - 1), tokens.back(),
                                     table.value(), pool_.view());
      if (!next.ok()) status = next.status();
      if (next.ok()) tokens.push_back(next.value());
    }
    blocks_.release(table.value());
    if (!status.ok()) return from_status(status, "/generate");
    return {http::status::ok, json{{"tokens", tokens}, {"ttft_ms", ttft}, {"total_ms", ms_since(started)}}};
  }

  Reply prefill(const std::string& body) {
    auto f = Fields::parse(
        body, {"prompt", "prompt_tokens", "prompt_seed", "n_new", "request_id", "decode", "stream"});
    if (!f.ok()) return from_status(f.status(), "/prefill");
    auto prompt = f->prompt(model_.shape().vocab);
    if (!prompt.ok()) return from_status(prompt.status(), "/prefill");
    auto n_new = f->u64("n_new", 16);
    auto id = f->u64("request_id");
    auto peer = f->text("decode");
    auto stream = f->boolean("stream", true);
    for (const Status& s : {n_new.status(), id.status(), peer.status(), stream.status()})
      if (!s.ok()) return from_status(s, "/prefill");
    if (n_new.value() == 0 || n_new.value() > 65536)
      return error(http::status::bad_request, "/prefill: 'n_new' must be 1 .. 65536");
    std::lock_guard lock(model_mutex_);
    auto table = take_blocks(prompt->size(), static_cast<uint32_t>(n_new.value()));
    if (!table.ok()) return from_status(table.status(), "/prefill");
    const RequestId rid = id.value();
    const auto& p = prompt.value();
    Status setup = Status::Ok();
    if (auto m = c_.get_num_new_matched_tokens(rid, p, 0); !m.ok()) setup = m.status();
    if (setup.ok()) setup = c_.update_state_after_alloc(rid, table.value(), 0);
    if (setup.ok())
      setup = c_.send_kv_to(
          rid, peer.value(),
          RequestContext{static_cast<uint32_t>(p.size()), p.back(), static_cast<uint32_t>(n_new.value())}
              .encode());
    if (!setup.ok()) {
      (void)c_.abort(rid);
      (void)c_.request_finished(rid);
      blocks_.release(table.value());
      return from_status(setup, "/prefill of request " + std::to_string(rid));
    }
    const auto started = Clock::now();
    Status save_error;
    auto first =
        model_.prefill_from(0, p, table.value(), pool_.view(), [&](uint32_t layer, void* cuda_stream) {
          if (!stream.value()) return;
          Status s = cuda_stream != nullptr ? c_.save_kv_layer(rid, layer, cuda_stream)
                                            : c_.save_kv_layer(rid, layer);
          if (!s.ok() && save_error.ok()) save_error = s;
        });
    const double prefill_ms = ms_since(started);
    // After the prefill every layer is complete (the model synchronizes before returning the token).
    for (uint32_t l = 0; first.ok() && !stream.value() && l < model_.shape().layers; ++l) {
      if (Status s = c_.save_kv_layer(rid, l); !s.ok() && save_error.ok()) save_error = s;
    }
    Status status = !first.ok() ? first.status() : save_error;
    if (!status.ok()) (void)c_.abort(rid);  // the stream ends before an unsaved layer; decode is told
    Status sent = c_.wait_for_send(rid);
    const double landed_ms = ms_since(started);
    (void)c_.request_finished(rid);
    blocks_.release(table.value());  // the stream has ended: nothing reads the blocks any more
    if (!status.ok()) return from_status(status, "/prefill of request " + std::to_string(rid));
    if (!sent.ok())
      return from_status(sent, "/prefill of request " + std::to_string(rid) + ": sending the KV");
    return {http::status::ok, json{{"first_token", first.value()},
                                   {"prefill_ms", prefill_ms},
                                   {"kv_landed_ms", landed_ms},
                                   {"prompt_tokens", p.size()},
                                   {"streamed", stream.value()}}};
  }

  Reply decode(const std::string& body) {
    auto f = Fields::parse(body, {"request_id", "first_token", "n_new", "timeout_ms"});
    if (!f.ok()) return from_status(f.status(), "/decode");
    auto id = f->u64("request_id");
    auto first = f->u64("first_token");
    auto timeout = f->u64("timeout_ms", 60000);
    for (const Status& s : {id.status(), first.status(), timeout.status()})
      if (!s.ok()) return from_status(s, "/decode");
    if (first.value() >= model_.shape().vocab)
      return error(http::status::bad_request, "/decode: 'first_token' is not below the vocab size");
    const auto waiting = Clock::now();
    std::optional<ReceivedKv> kv;
    {
      std::unique_lock lock(arrived_mutex_);
      arrived_cv_.wait_for(lock, std::chrono::milliseconds(timeout.value()),
                           [&] { return arrived_.count(id.value()) != 0; });
      auto it = arrived_.find(id.value());
      if (it == arrived_.end())
        return error(http::status::gateway_timeout,
                     "/decode: the KV of request " + std::to_string(id.value()) + " did not arrive within " +
                         std::to_string(timeout.value()) + " ms");
      kv = std::move(it->second.kv);
      arrived_.erase(it);
    }
    const double kv_wait_ms = ms_since(waiting);
    RequestContext context;
    if (!RequestContext::decode(kv->context, &context)) {
      blocks_.release(kv->blocks);
      return error(http::status::bad_gateway, "/decode: the KV arrived without a valid request context");
    }
    auto n_new = f->u64("n_new", context.n_new);
    if (!n_new.ok() || n_new.value() == 0 || n_new.value() > context.n_new) {
      blocks_.release(kv->blocks);
      return error(http::status::bad_request, "/decode: 'n_new' must be 1 .. " +
                                                  std::to_string(context.n_new) +
                                                  " (the blocks the prefill engine sent)");
    }
    std::lock_guard lock(model_mutex_);
    const auto started = Clock::now();
    std::vector<uint32_t> tokens{static_cast<uint32_t>(first.value())};
    Status status;
    // Exactly what one engine does after its prefill: the first token goes in at the prompt's end.
    for (uint32_t i = 1; status.ok() && i < n_new.value(); ++i) {
      auto next = model_.decode_step(context.prompt_tokens + i - 1, tokens.back(), kv->blocks, pool_.view());
      if (!next.ok()) status = next.status();
      if (next.ok()) tokens.push_back(next.value());
    }
    blocks_.release(kv->blocks);
    if (!status.ok()) return from_status(status, "/decode");
    return {http::status::ok, json{{"tokens", tokens},
                                   {"kv_wait_ms", kv_wait_ms},
                                   {"decode_ms", ms_since(started)},
                                   {"kv_layer_arrival_ms", kv->layer_arrival_ms}}};
  }

  // Moves requests whose KV arrived from the connector to arrived_, where /decode finds them; KV
  // nobody asks for within kUnclaimedKvTimeout is dropped (its blocks freed), with a warning.
  void poll_received() {
    while (!stopping_) {
      const FinishedRequests finished = c_.get_finished();
      if (finished.receiving.empty()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      std::lock_guard lock(arrived_mutex_);
      for (RequestId id : finished.receiving) {
        auto kv = c_.take_received(id);
        if (kv.ok()) arrived_[id] = Arrived{std::move(kv.value()), Clock::now()};
      }
      if (!finished.receiving.empty()) arrived_cv_.notify_all();
      for (auto it = arrived_.begin(); it != arrived_.end();) {
        if (Clock::now() - it->second.at < kUnclaimedKvTimeout) {
          ++it;
          continue;
        }
        spdlog::warn("engine {}: the KV of request {} was never asked for by /decode; dropped", o_.name,
                     it->first);
        blocks_.release(it->second.kv.blocks);
        it = arrived_.erase(it);
      }
    }
  }

  struct Arrived {
    ReceivedKv kv;
    Clock::time_point at;
  };
  const EngineServiceOptions& o_;
  EngineModel& model_;
  KvPool& pool_;
  BlockManager& blocks_;
  KvConnector& c_;
  std::mutex model_mutex_;  // one request at a time on the model
  std::mutex arrived_mutex_;
  std::condition_variable arrived_cv_;
  std::unordered_map<RequestId, Arrived> arrived_;
  std::atomic<bool> stopping_{false};
  std::thread poller_;
};

// One HTTP connection, keep-alive, on its own thread.
void serve_connection(Service& service, tcp::socket& socket) {
  beast::flat_buffer buffer;
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(kMaxBodyBytes);
    beast::error_code ec;
    http::read(socket, buffer, parser, ec);
    if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset ||
        ec == asio::error::operation_aborted || ec == asio::error::bad_descriptor)
      return;
    Reply reply;
    bool keep_alive = false;
    if (ec) {
      reply =
          error(ec == http::error::body_limit ? http::status::payload_too_large : http::status::bad_request,
                "bad HTTP request: " + ec.message());
    } else {
      const auto& req = parser.get();
      keep_alive = req.keep_alive();
      reply = service.handle(req);
    }
    http::response<http::string_body> res{reply.status, 11};
    res.set(http::field::content_type, "application/json");
    res.keep_alive(keep_alive);
    res.body() = reply.body.dump() + "\n";
    res.prepare_payload();
    http::write(socket, res, ec);
    if (ec || !keep_alive) return;
  }
}

}  // namespace

int run_engine_service(const EngineServiceOptions& o, const std::atomic<bool>& stop) {
  const auto loading = Clock::now();
  auto model = EngineModel::create(o.shape, o.seed, o.device,
                                   std::min<uint32_t>(16384, o.pool_blocks * o.shape.block_tokens));
  if (!model.ok()) {
    std::fprintf(stderr, "kvfabric-engine %s: model: %s\n", o.name.c_str(),
                 model.status().to_string().c_str());
    return 1;
  }
  auto pool = KvPool::create(o.shape.kv_layout_desc(o.pool_blocks), o.device, 0xFF);
  if (!pool.ok()) {
    std::fprintf(stderr, "kvfabric-engine %s: KV pool: %s\n", o.name.c_str(),
                 pool.status().to_string().c_str());
    return 1;
  }
  BlockManager blocks(o.pool_blocks);
  KvConnectorOptions co;
  co.name = "kvfabric-engine-" + o.name;
  co.model = o.model_name;
  co.memory = o.device < 0 ? LayerMemory::kHost : LayerMemory::kCuda;
  if (o.role != "prefill") {
    co.listen = o.host + ":0";  // the KV port: any free one, told by /health
    co.allocate_blocks = [&blocks](RequestId, uint32_t n) { return blocks.allocate(n); };
    co.release_blocks = [&blocks](RequestId, std::vector<uint32_t> b) { blocks.release(b); };
  }
  auto connector = KvConnector::create(co);
  if (!connector.ok()) {
    std::fprintf(stderr, "kvfabric-engine %s: connector: %s\n", o.name.c_str(),
                 connector.status().to_string().c_str());
    return 1;
  }
  if (Status s = connector.value()->register_kv_caches(pool->view()); !s.ok()) {
    std::fprintf(stderr, "kvfabric-engine %s: register_kv_caches: %s\n", o.name.c_str(),
                 s.to_string().c_str());
    return 1;
  }
  Service service(o, *model.value(), pool.value(), blocks, *connector.value());

  asio::io_context io;
  tcp::acceptor acceptor(io);
  beast::error_code ec;
  const auto address = asio::ip::make_address(o.host, ec);
  if (!ec) acceptor.open(address.is_v6() ? tcp::v6() : tcp::v4(), ec);
  if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(tcp::endpoint(address, o.port), ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    std::fprintf(stderr, "kvfabric-engine %s: serving HTTP on %s:%u: %s\n", o.name.c_str(), o.host.c_str(),
                 o.port, ec.message().c_str());
    return 1;
  }
  std::mutex connections_mutex;
  std::vector<std::pair<std::shared_ptr<tcp::socket>, std::thread>> connections;
  std::function<void()> accept = [&] {
    acceptor.async_accept([&](beast::error_code error_code, tcp::socket socket) {
      if (error_code) return;
      auto shared = std::make_shared<tcp::socket>(std::move(socket));
      std::lock_guard lock(connections_mutex);
      connections.emplace_back(shared,
                               std::thread([&service, shared] { serve_connection(service, *shared); }));
      accept();
    });
  };
  accept();
  std::printf("kvfabric-engine %s (%s, %s on %s, model %s) serving on %s:%u", o.name.c_str(), o.role.c_str(),
              o.shape.to_string().c_str(),
              o.device < 0 ? "the CPU" : ("cuda:" + std::to_string(o.device)).c_str(), o.model_name.c_str(),
              o.host.c_str(), acceptor.local_endpoint().port());
  if (connector.value()->listen_port() != 0) std::printf("; KV port %u", connector.value()->listen_port());
  std::printf(" (ready in %.0f ms)\n", ms_since(loading));
  std::fflush(stdout);
  while (!stop) io.run_for(std::chrono::milliseconds(100));
  acceptor.close(ec);
  {
    std::lock_guard lock(connections_mutex);
    // Wakes connection threads blocked in a read (a keep-alive client that stays connected).
    for (auto& [socket, thread] : connections) ::shutdown(socket->native_handle(), SHUT_RDWR);
  }
  for (auto& [socket, thread] : connections) thread.join();
  std::printf("kvfabric-engine %s: stopping\n", o.name.c_str());
  return 0;
}

}  // namespace kvf::engines
