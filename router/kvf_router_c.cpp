// The C ABI over RouterClient: converts arguments, catches everything (no exception crosses into
// C), and keeps the last error's text on the handle.
#include "kvf/router/kvf_router.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "kvf/router/router_client.h"

using kvf::ErrorCode;
using kvf::Status;
using kvf::router::ChunkKey;
using kvf::router::NodeReply;
using kvf::router::RouterClient;

struct kvf_router {
  std::unique_ptr<RouterClient> client;
  std::string last_error;
};

namespace {

void copy_text(char* out, size_t capacity, const std::string& text) {
  if (out == nullptr || capacity == 0) return;
  const size_t n = std::min(text.size(), capacity - 1);
  std::memcpy(out, text.data(), n);
  out[n] = '\0';
}

template <size_t N>
void copy_name(char (&out)[N], const std::string& text) {
  copy_text(out, N, text);
}

int fail(kvf_router* r, const Status& status) {
  r->last_error = status.to_string();
  return static_cast<int>(status.code());
}

int fail(kvf_router* r, int code, std::string text) {
  r->last_error = std::move(text);
  return code;
}

int ok(kvf_router* r) {
  r->last_error.clear();
  return KVF_ROUTER_OK;
}

std::vector<ChunkKey> keys_of(const kvf_router_key* keys, size_t n) {
  std::vector<ChunkKey> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = ChunkKey{keys[i].hi, keys[i].lo};
  return out;
}

std::string_view node_of(const char* node) {
  return node == nullptr ? std::string_view() : node;
}

// Runs `body` with the handle checked and every exception turned into KVF_ROUTER_INTERNAL.
template <typename Body>
int guarded(kvf_router* r, Body body) {
  if (r == nullptr) return KVF_ROUTER_INVALID_ARGUMENT;
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return fail(r, static_cast<int>(ErrorCode::kOutOfMemory), "out of memory");
  } catch (const std::exception& e) {
    return fail(r, KVF_ROUTER_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(r, KVF_ROUTER_INTERNAL, "internal error");
  }
}

// Fills the per-node results; `fill` copies the call's own fields of a successful reply.
template <typename T, typename Fill>
int per_node(kvf_router* r, const kvf::Result<std::vector<NodeReply<T>>>& replies,
             kvf_router_node_result* out, size_t* count, Fill fill) {
  if (!replies.ok()) return fail(r, replies.status());
  if (count == nullptr) return fail(r, KVF_ROUTER_INVALID_ARGUMENT, "count is NULL");
  const size_t capacity = *count;
  *count = replies->size();
  if (replies->size() > capacity || (out == nullptr && !replies->empty())) {
    return fail(
        r, KVF_ROUTER_BUFFER_TOO_SMALL,
        "results hold " + std::to_string(capacity) + ", " + std::to_string(replies->size()) + " needed");
  }
  std::string errors;
  for (size_t i = 0; i < replies->size(); ++i) {
    const NodeReply<T>& reply = (*replies)[i];
    kvf_router_node_result& o = out[i];
    o = kvf_router_node_result{};
    copy_name(o.node, reply.node);
    o.reached = reply.reached ? 1 : 0;
    o.status = static_cast<int>(reply.result.status().code());
    if (reply.result.ok()) {
      fill(reply.result.value(), o);
    } else {
      errors += (errors.empty() ? "" : "; ") + std::string("node ") + reply.node + " (" + reply.endpoint +
                "): " + reply.result.status().to_string();
    }
  }
  r->last_error = errors;  // the call itself succeeded; say which nodes did not
  return KVF_ROUTER_OK;
}

}  // namespace

extern "C" {

kvf_router* kvf_router_create_from_topology(const char* topology_path, uint32_t timeout_ms, char* error_buf,
                                            size_t error_buf_len) {
  try {
    if (topology_path == nullptr) {
      copy_text(error_buf, error_buf_len, "topology_path is NULL");
      return nullptr;
    }
    kvf::router::RouterOptions options;
    if (timeout_ms != 0) options.timeout = std::chrono::milliseconds(timeout_ms);
    auto client = RouterClient::from_topology_file(topology_path, options);
    if (!client.ok()) {
      copy_text(error_buf, error_buf_len, client.status().to_string());
      return nullptr;
    }
    auto* r = new kvf_router;
    r->client = std::move(client.value());
    copy_text(error_buf, error_buf_len, "");
    return r;
  } catch (const std::exception& e) {
    copy_text(error_buf, error_buf_len, std::string("cannot create the router client: ") + e.what());
    return nullptr;
  }
}

kvf_router* kvf_router_create_from_endpoints(const char* const* nodes, const char* const* hosts,
                                             const uint16_t* ports, size_t count, uint32_t timeout_ms) {
  try {
    if (count != 0 && (nodes == nullptr || hosts == nullptr || ports == nullptr)) return nullptr;
    kvf::router::RouterConfig config;
    for (size_t i = 0; i < count; ++i) {
      if (nodes[i] == nullptr || hosts[i] == nullptr) return nullptr;
      config.daemons.push_back(kvf::router::DaemonEndpoint{nodes[i], hosts[i], ports[i]});
    }
    kvf::router::RouterOptions options;
    if (timeout_ms != 0) options.timeout = std::chrono::milliseconds(timeout_ms);
    auto* r = new kvf_router;
    r->client = std::make_unique<RouterClient>(std::move(config), options);
    return r;
  } catch (...) {
    return nullptr;
  }
}

void kvf_router_destroy(kvf_router* router) {
  delete router;
}

const char* kvf_router_last_error(kvf_router* router) {
  return router == nullptr ? "router handle is NULL" : router->last_error.c_str();
}

int kvf_router_chunk_keys(kvf_router* router, const char* model, const uint32_t* tokens, size_t num_tokens,
                          kvf_router_key* keys, size_t* count) {
  return guarded(router, [&]() -> int {
    if (model == nullptr || count == nullptr || (tokens == nullptr && num_tokens != 0)) {
      return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "model, tokens and count must not be NULL");
    }
    auto hashed = router->client->chunk_keys(model, std::span<const uint32_t>(tokens, num_tokens));
    if (!hashed.ok()) return fail(router, hashed.status());
    const size_t capacity = *count;
    *count = hashed->size();
    if (hashed->size() > capacity || (keys == nullptr && !hashed->empty())) {
      return fail(router, KVF_ROUTER_BUFFER_TOO_SMALL, std::to_string(hashed->size()) + " keys need room");
    }
    for (size_t i = 0; i < hashed->size(); ++i) keys[i] = kvf_router_key{(*hashed)[i].hi, (*hashed)[i].lo};
    return ok(router);
  });
}

int kvf_router_lookup(kvf_router* router, const char* model, const uint32_t* tokens, size_t num_tokens,
                      kvf_router_node_match* nodes, size_t* count, uint32_t* query_chunks) {
  return guarded(router, [&]() -> int {
    if (model == nullptr || count == nullptr || (tokens == nullptr && num_tokens != 0)) {
      return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "model, tokens and count must not be NULL");
    }
    auto report = router->client->lookup(model, std::span<const uint32_t>(tokens, num_tokens));
    if (!report.ok()) return fail(router, report.status());
    if (query_chunks != nullptr) *query_chunks = report->query_chunks;
    const size_t capacity = *count;
    *count = report->nodes.size();
    if (report->nodes.size() > capacity || (nodes == nullptr && !report->nodes.empty())) {
      return fail(router, KVF_ROUTER_BUFFER_TOO_SMALL,
                  std::to_string(report->nodes.size()) + " nodes need room");
    }
    std::string errors;
    for (size_t i = 0; i < report->nodes.size(); ++i) {
      const auto& n = report->nodes[i];
      kvf_router_node_match& o = nodes[i];
      o = kvf_router_node_match{};
      copy_name(o.node, n.node);
      o.reached = n.reached ? 1 : 0;
      o.status = static_cast<int>(n.result.status().code());
      if (n.result.ok()) {
        o.matched_tokens = n.result->matched_tokens;
        o.matched_chunks = n.result->matched_chunks;
        copy_name(o.tier, std::string(kvf::router::tier_name(n.result->tier)));
      } else {
        errors += (errors.empty() ? "" : "; ") + std::string("node ") + n.node + " (" + n.endpoint +
                  "): " + n.result.status().to_string();
      }
    }
    router->last_error = errors;
    return KVF_ROUTER_OK;
  });
}

int kvf_router_best_engine(kvf_router* router, const char* model, const uint32_t* tokens, size_t num_tokens,
                           kvf_router_engine* best) {
  return guarded(router, [&]() -> int {
    if (model == nullptr || best == nullptr || (tokens == nullptr && num_tokens != 0)) {
      return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "model, tokens and best must not be NULL");
    }
    auto picked = router->client->best_engine(model, std::span<const uint32_t>(tokens, num_tokens));
    if (!picked.ok()) return fail(router, picked.status());
    *best = kvf_router_engine{};
    copy_name(best->node, picked->engine.node);
    copy_name(best->engine, picked->engine.engine);
    copy_name(best->role, picked->engine.role);
    best->matched_tokens = picked->engine.matched_tokens;
    best->matched_chunks = picked->engine.matched_chunks;
    best->cached = picked->cached ? 1 : 0;
    return ok(router);
  });
}

int kvf_router_pin(kvf_router* router, const kvf_router_key* keys, size_t num_keys, const char* node,
                   kvf_router_node_result* results, size_t* count) {
  return guarded(router, [&]() -> int {
    if (keys == nullptr && num_keys != 0) return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "keys is NULL");
    const auto k = keys_of(keys, num_keys);
    return per_node(router, router->client->pin(k, node_of(node)), results, count,
                    [](const kvf::router::PinCount& c, kvf_router_node_result& o) {
                      o.changed = c.changed;
                      o.not_found = c.not_found.size();
                    });
  });
}

int kvf_router_unpin(kvf_router* router, const kvf_router_key* keys, size_t num_keys, const char* node,
                     kvf_router_node_result* results, size_t* count) {
  return guarded(router, [&]() -> int {
    if (keys == nullptr && num_keys != 0) return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "keys is NULL");
    const auto k = keys_of(keys, num_keys);
    return per_node(router, router->client->unpin(k, node_of(node)), results, count,
                    [](const kvf::router::PinCount& c, kvf_router_node_result& o) {
                      o.changed = c.changed;
                      o.not_found = c.not_found.size();
                    });
  });
}

int kvf_router_clear(kvf_router* router, const kvf_router_key* keys, size_t num_keys, const char* node,
                     kvf_router_node_result* results, size_t* count) {
  return guarded(router, [&]() -> int {
    auto fill = [](const kvf::router::ClearCount& c, kvf_router_node_result& o) {
      o.changed = c.cleared;
      o.not_found = c.freed_bytes;
    };
    if (keys == nullptr && num_keys == 0) {
      return per_node(router, router->client->clear_all(node_of(node)), results, count, fill);
    }
    if (keys == nullptr) return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "keys is NULL");
    const auto k = keys_of(keys, num_keys);
    return per_node(router, router->client->clear_keys(k, node_of(node)), results, count, fill);
  });
}

int kvf_router_clear_model(kvf_router* router, const char* model, const char* node,
                           kvf_router_node_result* results, size_t* count) {
  return guarded(router, [&]() -> int {
    if (model == nullptr || *model == '\0')
      return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "model is NULL or empty");
    return per_node(router, router->client->clear_model(model, node_of(node)), results, count,
                    [](const kvf::router::ClearCount& c, kvf_router_node_result& o) {
                      o.changed = c.cleared;
                      o.not_found = c.freed_bytes;
                    });
  });
}

int kvf_router_move(kvf_router* router, const char* from, const char* to, const kvf_router_key* keys,
                    size_t num_keys, int copy, uint64_t* moved) {
  return guarded(router, [&]() -> int {
    if (from == nullptr || to == nullptr || (keys == nullptr && num_keys != 0)) {
      return fail(router, KVF_ROUTER_INVALID_ARGUMENT, "from, to and keys must not be NULL");
    }
    const auto k = keys_of(keys, num_keys);
    auto result = router->client->move(from, to, k, copy != 0);
    if (!result.ok()) return fail(router, result.status());
    if (moved != nullptr) *moved = result->moved;
    return ok(router);
  });
}

int kvf_router_health(kvf_router* router, const char* node, kvf_router_node_result* results, size_t* count) {
  return guarded(router, [&]() -> int {
    return per_node(
        router, router->client->health(node_of(node)), results, count,
        [](const kvf::router::NodeHealth& h, kvf_router_node_result& o) { o.healthy = h.healthy; });
  });
}

int kvf_router_stats(kvf_router* router, const char* node, kvf_router_node_result* results, size_t* count) {
  return guarded(router, [&]() -> int {
    return per_node(router, router->client->stats(node_of(node)), results, count,
                    [](const kvf::router::NodeStats& s, kvf_router_node_result& o) {
                      o.entries = s.entries;
                      o.pinned_entries = s.pinned_entries;
                      for (const auto& t : s.tiers) {
                        o.used_bytes += t.used_bytes;
                        o.capacity_bytes += t.capacity_bytes;
                      }
                    });
  });
}

}  // extern "C"
