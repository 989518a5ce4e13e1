#include "kvf/router/router_client.h"

#include <algorithm>
#include <mutex>
#include <utility>

#include <boost/asio/io_context.hpp>

#include "daemon_json.h"
#include "node_connection.h"

namespace kvf::router {

namespace http = boost::beast::http;

namespace {

int role_rank(const std::string& role) {  // lower is preferred: can the engine finish a request alone?
  if (role == "both") return 0;
  if (role == "decode") return 1;
  return 2;
}

}  // namespace

struct RouterClient::Impl {
  RouterConfig config;
  RouterOptions options;
  std::mutex mutex;  // one call at a time: the io_context and the connections are not shared
  boost::asio::io_context io;
  std::vector<std::unique_ptr<NodeConnection>> nodes;  // one per config.daemons entry

  // The connections a call goes to: all, or the one named; kNotFound for an unknown name.
  Result<std::vector<size_t>> select(std::string_view node) const {
    std::vector<size_t> picked;
    for (size_t i = 0; i < config.daemons.size(); ++i) {
      if (node.empty() || config.daemons[i].node == node) picked.push_back(i);
    }
    if (!node.empty() && picked.empty()) {
      std::string known;
      for (const auto& d : config.daemons) known += (known.empty() ? "" : ", ") + d.node;
      return Status(ErrorCode::kNotFound,
                    "no node '" + std::string(node) + "' (known: " + (known.empty() ? "none" : known) + ")");
    }
    return picked;
  }

  // Sends one request to each picked node at once and waits (at most the timeout) for all of them;
  // each reply is turned into a T by `parse`. Non-2xx replies become the daemon's error status.
  template <typename T, typename Parse>
  std::vector<NodeReply<T>> exchange(const std::vector<size_t>& picked, http::verb method,
                                     const std::string& target, const std::string& body, Parse parse,
                                     bool body_on_error = false) {
    std::vector<NodeReply<T>> replies(picked.size());
    const auto deadline = NodeConnection::Clock::now() + options.timeout;
    for (size_t i = 0; i < picked.size(); ++i) {
      NodeConnection& conn = *nodes[picked[i]];
      NodeReply<T>& reply = replies[i];
      reply.node = conn.endpoint().node;
      reply.endpoint = conn.address();
      conn.start(method, target, body, deadline,
                 [&reply, &parse, body_on_error](bool reached, Result<HttpReply> http_reply) {
                   reply.reached = reached;
                   if (!http_reply.ok()) {
                     reply.result = http_reply.status();
                   } else if (http_reply->status < 200 || http_reply->status >= 300) {
                     Result<T> parsed = body_on_error ? parse(reply.node, http_reply->body)
                                                      : Result<T>(Status(ErrorCode::kInternal, "not parsed"));
                     reply.result = body_on_error && parsed.ok()
                                        ? std::move(parsed)
                                        : Result<T>(error_status(http_reply->status, http_reply->body));
                   } else {
                     reply.result = parse(reply.node, http_reply->body);
                   }
                 });
    }
    io.restart();
    io.run();  // every connection's operations carry the deadline, so this returns by then
    return replies;
  }
};

RouterClient::RouterClient(RouterConfig config, RouterOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->options = options;
  for (const auto& daemon : impl_->config.daemons) {
    impl_->nodes.push_back(std::make_unique<NodeConnection>(impl_->io, daemon, options.max_reply_bytes));
  }
}

RouterClient::~RouterClient() = default;

Result<std::unique_ptr<RouterClient>> RouterClient::from_topology_file(const std::string& path,
                                                                       RouterOptions options) {
  auto config = RouterConfig::from_topology_file(path);
  if (!config.ok()) return config.status();
  return std::make_unique<RouterClient>(std::move(config.value()), options);
}

const RouterConfig& RouterClient::config() const {
  return impl_->config;
}

Result<std::vector<ChunkKey>> RouterClient::chunk_keys(std::string_view model,
                                                       std::span<const uint32_t> tokens) const {
  const fabric::ModelSpec* spec = impl_->config.find_model(model);
  if (spec == nullptr) {
    return Status(ErrorCode::kInvalidArgument,
                  "model '" + std::string(model) + "' is not in this client's configuration");
  }
  // The same hasher, fingerprint and chunk size as the daemon's /lookup and the engines' stores.
  const protocol::ChunkHasher hasher(protocol::model_fingerprint(spec->name, spec->layout),
                                     spec->chunk_tokens);
  return hasher.hash(tokens);
}

Result<LookupReport> RouterClient::lookup(std::string_view model, std::span<const uint32_t> tokens,
                                          std::string_view node) {
  std::string body;
  LookupReport report;
  report.model = std::string(model);
  if (impl_->config.find_model(model) != nullptr) {
    auto keys = chunk_keys(model, tokens);
    if (!keys.ok()) return keys.status();
    report.query_chunks = static_cast<uint32_t>(keys->size());
    body = lookup_body_keys(model, keys.value());
  } else if (!impl_->config.models.empty()) {
    return Status(ErrorCode::kInvalidArgument,
                  "model '" + std::string(model) + "' is not in this client's configuration");
  } else {
    body = lookup_body_tokens(model, tokens);
  }
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  report.nodes = impl_->exchange<NodeMatch>(
      *picked, http::verb::post, "/lookup", body,
      [](const std::string& name, const std::string& reply) { return parse_lookup(reply, name); });
  for (const auto& n : report.nodes) {
    if (!n.result.ok()) continue;
    if (report.query_chunks == 0) report.query_chunks = n.result->query_chunks;
    if (n.result->matched_tokens == 0) continue;
    bool any_engine = false;
    for (const auto& engine : impl_->config.engines) {
      if (engine.node != n.node || engine.model != model) continue;
      any_engine = true;
      report.engines.push_back(
          EngineMatch{n.node, engine.name, std::string(fabric::engine_role_name(engine.role)),
                      n.result->matched_tokens, n.result->matched_chunks, n.result->tier});
    }
    if (!any_engine) {
      report.engines.push_back(
          EngineMatch{n.node, "", "", n.result->matched_tokens, n.result->matched_chunks, n.result->tier});
    }
  }
  // Best first; stable, so equal ones keep the configuration's order (nodes, then engines).
  std::stable_sort(report.engines.begin(), report.engines.end(),
                   [](const EngineMatch& a, const EngineMatch& b) {
                     if (a.matched_tokens != b.matched_tokens) return a.matched_tokens > b.matched_tokens;
                     if (a.tier != b.tier) return a.tier < b.tier;
                     return role_rank(a.role) < role_rank(b.role);
                   });
  return report;
}

Result<BestEngine> RouterClient::best_engine(std::string_view model, std::span<const uint32_t> tokens) {
  auto report = lookup(model, tokens);
  if (!report.ok()) return report.status();
  BestEngine best;
  if (!report->engines.empty()) {
    best.engine = report->engines.front();
    best.cached = true;
    best.report = std::move(report.value());
    return best;
  }
  // Nothing cached: an engine that can serve the request, preferring nodes that answered.
  const fabric::EngineSpec* fallback = nullptr;
  for (int pass = 0; pass < 2 && fallback == nullptr; ++pass) {
    for (const auto& engine : impl_->config.engines) {
      if (engine.model != model || engine.role == fabric::EngineRole::kPrefill) continue;
      const bool node_up = std::any_of(report->nodes.begin(), report->nodes.end(),
                                       [&](const auto& n) { return n.node == engine.node && n.reached; });
      if (pass == 0 && !node_up) continue;
      fallback = &engine;
      break;
    }
  }
  if (fallback == nullptr) {
    return Status(ErrorCode::kNotFound,
                  "no node holds a prefix and the configuration has no engine of model '" +
                      std::string(model) + "' with role decode or both");
  }
  best.engine =
      EngineMatch{fallback->node, fallback->name, std::string(fabric::engine_role_name(fallback->role)), 0, 0,
                  Tier::kDram};
  best.cached = false;
  best.report = std::move(report.value());
  return best;
}

Result<std::vector<NodeReply<PinCount>>> RouterClient::pin(std::span<const ChunkKey> keys,
                                                           std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<PinCount>(
      *picked, http::verb::post, "/pin", keys_body(keys),
      [](const std::string&, const std::string& b) { return parse_pin(b, true); });
}

Result<std::vector<NodeReply<PinCount>>> RouterClient::unpin(std::span<const ChunkKey> keys,
                                                             std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<PinCount>(
      *picked, http::verb::post, "/unpin", keys_body(keys),
      [](const std::string&, const std::string& b) { return parse_pin(b, false); });
}

Result<std::vector<NodeReply<ClearCount>>> RouterClient::clear_all(std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<ClearCount>(*picked, http::verb::post, "/clear", clear_all_body(),
                                     [](const std::string&, const std::string& b) { return parse_clear(b); });
}

Result<std::vector<NodeReply<ClearCount>>> RouterClient::clear_keys(std::span<const ChunkKey> keys,
                                                                    std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<ClearCount>(*picked, http::verb::post, "/clear", keys_body(keys),
                                     [](const std::string&, const std::string& b) { return parse_clear(b); });
}

Result<std::vector<NodeReply<ClearCount>>> RouterClient::clear_model(std::string_view model,
                                                                     std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<ClearCount>(*picked, http::verb::post, "/clear", clear_model_body(model),
                                     [](const std::string&, const std::string& b) { return parse_clear(b); });
}

Result<MoveCount> RouterClient::move(std::string_view from, std::string_view to,
                                     std::span<const ChunkKey> keys, bool copy) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(from);
  if (from.empty()) return Status(ErrorCode::kInvalidArgument, "move needs the source node");
  if (!picked.ok()) return picked.status();
  auto replies =
      impl_->exchange<MoveCount>(*picked, http::verb::post, "/move", move_body(from, to, keys, copy),
                                 [](const std::string&, const std::string& b) { return parse_move(b); });
  NodeReply<MoveCount>& reply = replies.front();
  if (!reply.result.ok()) {
    const Status& s = reply.result.status();
    return Status(s.code(), impl_->config.daemons[picked->front()].to_string() + ": " + s.message());
  }
  return std::move(reply.result.value());
}

Result<std::vector<NodeReply<NodeHealth>>> RouterClient::health(std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<NodeHealth>(
      *picked, http::verb::get, "/health", "",
      [](const std::string&, const std::string& b) { return parse_health(b); },
      /*body_on_error=*/true);  // unhealthy is 503 with the report
}

Result<std::vector<NodeReply<NodeStats>>> RouterClient::stats(std::string_view node) {
  std::lock_guard lock(impl_->mutex);
  auto picked = impl_->select(node);
  if (!picked.ok()) return picked.status();
  return impl_->exchange<NodeStats>(*picked, http::verb::get, "/stats", "",
                                    [](const std::string&, const std::string& b) { return parse_stats(b); });
}

size_t LookupReport::nodes_down() const {
  return static_cast<size_t>(
      std::count_if(nodes.begin(), nodes.end(), [](const auto& n) { return !n.reached; }));
}

}  // namespace kvf::router
