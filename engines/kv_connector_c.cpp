// The C ABI over KvConnector (include/kvf/engines/kv_connector_c.h): checks and converts the
// arguments, catches everything (no exception crosses into C), and keeps the last error's text per
// handle and per calling thread.
#include "kvf/engines/kv_connector_c.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvf/engines/kv_connector.h"
#include "kvf/protocol/kv_layout.h"
#include "kvf/store/store_client.h"

using kvf::ErrorCode;
using kvf::Status;
using kvf::engines::KvConnector;

struct kvf_connector {
  // Declared before the connector, so destroyed after it (the connector must not outlive it).
  std::unique_ptr<kvf::store::StoreClient> store;
  std::unique_ptr<KvConnector> connector;

  // Each thread's last error on this handle. A thread only ever touches its own string; the map
  // itself (node-based: a string never moves) is guarded by errors_mu.
  mutable std::mutex errors_mu;
  mutable std::unordered_map<std::thread::id, std::string> errors;

  // What get_finished / get_block_ids_with_load_errors took from the connector but could not hand
  // over for lack of room, handed over first next time.
  std::mutex pending_mu;
  std::deque<uint64_t> pending_sending;
  std::deque<uint64_t> pending_receiving;
  std::deque<uint32_t> pending_load_errors;

  std::string& error_slot() const {
    std::lock_guard lock(errors_mu);
    return errors[std::this_thread::get_id()];
  }
};

// A PD request's received KV, the caller's until kvf_connector_received_free.
struct kvf_connector_received {
  kvf::engines::ReceivedKv kv;
};

namespace {

// Errors of calls without a usable handle: a failed create, a NULL handle.
thread_local std::string t_handleless_error;

std::string& slot_of(const kvf_connector* c) {
  return c == nullptr ? t_handleless_error : c->error_slot();
}

// Never throws: a message that cannot be stored (no memory) leaves the slot empty.
int set_error(const kvf_connector* c, int code, const char* text) noexcept {
  try {
    slot_of(c) = text;
  } catch (...) {
  }
  return code;
}

// The message as Status::to_string() writes it ("invalid_argument: ..."), as for the connector's own.
int fail(const kvf_connector* c, int code, const std::string& text) noexcept {
  try {
    return set_error(c, code, Status(static_cast<ErrorCode>(code), text).to_string().c_str());
  } catch (...) {
    return set_error(c, code, "");
  }
}

int fail(const kvf_connector* c, const Status& status) noexcept {
  try {
    return set_error(c, static_cast<int>(status.code()), status.to_string().c_str());
  } catch (...) {
    return set_error(c, static_cast<int>(status.code()), "");
  }
}

int ok(const kvf_connector* c) noexcept {
  try {
    slot_of(c).clear();
  } catch (...) {
  }
  return KVF_CONNECTOR_OK;
}

int done(const kvf_connector* c, const Status& status) noexcept {
  return status.ok() ? ok(c) : fail(c, status);
}

constexpr int kInvalid = KVF_CONNECTOR_INVALID_ARGUMENT;

// "FN: TEXT" as the error, built where an allocation failure cannot escape.
int fail_in(const kvf_connector* c, int code, const char* fn, const char* text) noexcept {
  try {
    return fail(c, code, std::string(fn) + ": " + text);
  } catch (...) {
    return set_error(c, code, "");
  }
}

// An exception that reached the boundary: KVF_CONNECTOR_INTERNAL with its what().
int fail_exception(const kvf_connector* c, const char* fn) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    try {
      return fail_in(c, KVF_CONNECTOR_INTERNAL, fn, (std::string("internal error: ") + e.what()).c_str());
    } catch (...) {
      return fail_in(c, KVF_CONNECTOR_INTERNAL, fn, "internal error");
    }
  } catch (...) {
    return fail_in(c, KVF_CONNECTOR_INTERNAL, fn, "internal error (an exception not from std::exception)");
  }
}

// Runs `body` with the handle checked (non-NULL, created) and every exception turned into
// KVF_CONNECTOR_INTERNAL carrying its what().
template <typename Body>
int guarded(kvf_connector* c, const char* fn, Body body) noexcept {
  if (c == nullptr) return fail_in(nullptr, kInvalid, fn, "the connector is NULL");
  try {
    if (c->connector == nullptr) return fail_in(c, kInvalid, fn, "the handle holds no connector");
    return body(*c->connector);
  } catch (...) {
    return fail_exception(c, fn);
  }
}

std::string null_arg(const char* fn, const char* arg) {
  return std::string(fn) + ": " + arg + " is NULL";
}

// Appends `fresh` to `pending`, then moves at most `capacity` of `pending` (oldest first) into
// `out`; *written is the count.
template <typename T, typename Src>
void hand_over(std::deque<T>& pending, const Src& fresh, T* out, size_t capacity, size_t* written) {
  pending.insert(pending.end(), fresh.begin(), fresh.end());
  const size_t n = out == nullptr ? 0 : std::min(capacity, pending.size());
  std::copy_n(pending.begin(), n, out);
  pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(n));
  *written = n;
}

// A received KV's array for an accessor: the pointer (NULL when empty) and its count.
template <typename T>
int hand_array(const char* fn, const std::vector<T>& values, const T** data, size_t* count) noexcept {
  if (data == nullptr || count == nullptr) {
    return fail_in(nullptr, kInvalid, fn,
                   data == nullptr ? "the array pointer is NULL" : "the count pointer is NULL");
  }
  *data = values.empty() ? nullptr : values.data();
  *count = values.size();
  return ok(nullptr);
}

// CUDA's cudaStreamLegacy, without the CUDA headers.
void* const kCudaStreamLegacy = reinterpret_cast<void*>(uintptr_t{1});

// The decode side's block manager in C, as KvConnector calls it (on its threads). Nothing thrown
// reaches the connector's threads: a failure to allocate the list refuses the request.
std::function<std::vector<uint32_t>(kvf::engines::RequestId, uint32_t)> c_allocate(
    kvf_connector_allocate_blocks_fn fn, void* user) {
  return [fn, user](kvf::engines::RequestId request, uint32_t n) -> std::vector<uint32_t> {
    try {
      std::vector<uint32_t> blocks(n);
      if (n == 0 || fn(user, request, n, blocks.data()) != 0) return {};
      return blocks;
    } catch (...) {
      return {};
    }
  };
}

std::function<void(kvf::engines::RequestId, std::vector<uint32_t>)> c_release(
    kvf_connector_release_blocks_fn fn, void* user) {
  return [fn, user](kvf::engines::RequestId request, std::vector<uint32_t> blocks) {
    fn(user, request, blocks.data(), blocks.size());
  };
}

// kvf_connector_create and kvf_connector_create_pd (pd may be NULL), as `fn`.
int create_connector(const char* fn, const kvf_connector_options* opts, const kvf_connector_pd_options* pd,
                     kvf_connector** out) noexcept {
  if (out == nullptr) return fail_in(nullptr, kInvalid, fn, "out is NULL");
  *out = nullptr;
  if (opts == nullptr) return fail_in(nullptr, kInvalid, fn, "opts is NULL");
  try {
    if (opts->model == nullptr || opts->model[0] == '\0') {
      return fail(nullptr, kInvalid, std::string(fn) + ": opts->model is NULL or empty");
    }
    kvf::engines::KvConnectorOptions o;
    o.model = opts->model;
    o.chunk_tokens = opts->chunk_tokens == 0 ? kvf::protocol::kDefaultChunkTokens : opts->chunk_tokens;
    o.verify_loads = opts->verify_loads != 0;
    switch (opts->memory) {
      case KVF_CONNECTOR_MEMORY_AUTO:
        o.memory = kvf::engines::LayerMemory::kAuto;
        break;
      case KVF_CONNECTOR_MEMORY_HOST:
        o.memory = kvf::engines::LayerMemory::kHost;
        break;
      case KVF_CONNECTOR_MEMORY_CUDA:
        o.memory = kvf::engines::LayerMemory::kCuda;
        break;
      default:
        return fail(nullptr, kInvalid,
                    std::string(fn) + ": opts->memory " + std::to_string(opts->memory) +
                        " is not one of KVF_CONNECTOR_MEMORY_AUTO (0), _HOST (1), _CUDA (2)");
    }
    if (pd != nullptr) {
      if (pd->listen != nullptr && pd->listen[0] != '\0') {
        if (pd->allocate_blocks == nullptr || pd->release_blocks == nullptr) {
          return fail(nullptr, kInvalid,
                      std::string(fn) +
                          ": pd->listen is set, so pd->allocate_blocks and pd->release_blocks " +
                          "are required (the decode side's block manager)");
        }
        o.listen = pd->listen;
      }
      if (pd->allocate_blocks != nullptr) o.allocate_blocks = c_allocate(pd->allocate_blocks, pd->user_data);
      if (pd->release_blocks != nullptr) o.release_blocks = c_release(pd->release_blocks, pd->user_data);
      if (pd->name != nullptr && pd->name[0] != '\0') o.name = pd->name;
    }
    auto handle = std::make_unique<kvf_connector>();
    if (opts->store_socket != nullptr && opts->store_socket[0] != '\0') {
      kvf::store::StoreClientOptions so;
      so.socket_path = opts->store_socket;
      so.client_name = std::string("kvf_connector ") + opts->model;
      handle->store = std::make_unique<kvf::store::StoreClient>(std::move(so));
      o.store = handle->store.get();
    }
    auto created = KvConnector::create(std::move(o));
    if (!created.ok()) return fail(nullptr, created.status());
    handle->connector = std::move(created).value();
    *out = handle.release();
    return ok(nullptr);
  } catch (...) {
    return fail_exception(nullptr, fn);
  }
}

}  // namespace

extern "C" {

void kvf_connector_options_init(kvf_connector_options* opts) {
  if (opts == nullptr) return;
  *opts = kvf_connector_options{};
  opts->chunk_tokens = kvf::protocol::kDefaultChunkTokens;
  opts->verify_loads = 1;
  opts->memory = KVF_CONNECTOR_MEMORY_AUTO;
}

void kvf_connector_pd_options_init(kvf_connector_pd_options* pd) {
  if (pd == nullptr) return;
  *pd = kvf_connector_pd_options{};
}

int kvf_connector_create(const kvf_connector_options* opts, kvf_connector** out) {
  return create_connector("kvf_connector_create", opts, nullptr, out);
}

int kvf_connector_create_pd(const kvf_connector_options* opts, const kvf_connector_pd_options* pd,
                            kvf_connector** out) {
  return create_connector("kvf_connector_create_pd", opts, pd, out);
}

void kvf_connector_destroy(kvf_connector* connector) {
  try {
    delete connector;
  } catch (...) {  // a destructor that throws terminates anyway; never let it reach C
  }
}

const char* kvf_connector_last_error(const kvf_connector* connector) {
  try {
    return slot_of(connector).c_str();
  } catch (...) {
    return "";
  }
}

const char* kvf_connector_status_name(int status) {
  if (status < 0 || status > static_cast<int>(ErrorCode::kUnavailable)) return "unknown";
  // error_code_name returns views of string literals: NUL-terminated.
  return kvf::error_code_name(static_cast<ErrorCode>(status)).data();
}

int kvf_connector_register_kv_caches(kvf_connector* connector, const kvf_connector_layout* layout,
                                     void* const* layers, uint32_t num_layers) {
  constexpr const char* fn = "kvf_connector_register_kv_caches";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (layout == nullptr) return fail(connector, kInvalid, null_arg(fn, "layout"));
    if (layers == nullptr) return fail(connector, kInvalid, null_arg(fn, "layers"));
    if (layout->kind < KVF_LAYOUT_FLASH_ATTENTION || layout->kind > KVF_LAYOUT_MLA) {
      return fail(connector, kInvalid,
                  std::string(fn) + ": layout->kind " + std::to_string(layout->kind) +
                      " is not one of KVF_LAYOUT_FLASH_ATTENTION (0), _FLASH_INFER (1), _MLA (2)");
    }
    if (num_layers != layout->num_layers) {
      return fail(connector, kInvalid,
                  std::string(fn) + ": " + std::to_string(num_layers) + " layer buffers for a layout of " +
                      std::to_string(layout->num_layers) + " layers");
    }
    kvf::protocol::KvLayoutDesc desc;
    desc.kind = static_cast<kvf::protocol::KvLayoutKind>(layout->kind);
    desc.num_layers = layout->num_layers;
    desc.num_blocks = layout->num_blocks;
    desc.block_tokens = layout->block_tokens;
    desc.kv_heads = layout->kv_heads;
    desc.head_dim = layout->head_dim;
    desc.dtype_bytes = layout->dtype_bytes;
    auto kv_layout = kvf::protocol::KvLayout::create(desc);
    if (!kv_layout.ok()) return fail(connector, kv_layout.status());
    std::vector<uint8_t*> ptrs(num_layers);
    for (uint32_t i = 0; i < num_layers; ++i) {
      if (layers[i] == nullptr) {
        return fail(connector, kInvalid, std::string(fn) + ": layers[" + std::to_string(i) + "] is NULL");
      }
      ptrs[i] = static_cast<uint8_t*>(layers[i]);
    }
    return done(connector, c.register_kv_caches(kvf::engines::KvCacheView{*kv_layout, std::move(ptrs)}));
  });
}

int kvf_connector_num_layers(const kvf_connector* connector, uint32_t* out) {
  constexpr const char* fn = "kvf_connector_num_layers";
  return guarded(const_cast<kvf_connector*>(connector), fn, [&](KvConnector& c) {
    if (out == nullptr) return fail(connector, kInvalid, null_arg(fn, "out"));
    *out = c.num_layers();
    return ok(connector);
  });
}

int kvf_connector_get_num_new_matched_tokens(kvf_connector* connector, uint64_t request,
                                             const uint32_t* tokens, size_t num_tokens,
                                             uint64_t num_computed_tokens, uint64_t* out) {
  constexpr const char* fn = "kvf_connector_get_num_new_matched_tokens";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (out == nullptr) return fail(connector, kInvalid, null_arg(fn, "out"));
    *out = 0;
    if (tokens == nullptr && num_tokens != 0) return fail(connector, kInvalid, null_arg(fn, "tokens"));
    auto matched = c.get_num_new_matched_tokens(request, std::span<const uint32_t>(tokens, num_tokens),
                                                num_computed_tokens);
    if (!matched.ok()) return fail(connector, matched.status());
    *out = *matched;
    return ok(connector);
  });
}

int kvf_connector_update_state_after_alloc(kvf_connector* connector, uint64_t request,
                                           const uint32_t* block_table, size_t num_blocks,
                                           uint64_t num_external_tokens) {
  constexpr const char* fn = "kvf_connector_update_state_after_alloc";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (block_table == nullptr && num_blocks != 0)
      return fail(connector, kInvalid, null_arg(fn, "block_table"));
    return done(connector,
                c.update_state_after_alloc(request, std::span<const uint32_t>(block_table, num_blocks),
                                           num_external_tokens));
  });
}

int kvf_connector_request_finished(kvf_connector* connector, uint64_t request, int* free_later) {
  constexpr const char* fn = "kvf_connector_request_finished";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (free_later == nullptr) return fail(connector, kInvalid, null_arg(fn, "free_later"));
    *free_later = 0;
    auto later = c.request_finished(request);
    if (!later.ok()) return fail(connector, later.status());
    *free_later = *later ? 1 : 0;
    return ok(connector);
  });
}

int kvf_connector_abort(kvf_connector* connector, uint64_t request) {
  return guarded(connector, "kvf_connector_abort",
                 [&](KvConnector& c) { return done(connector, c.abort(request)); });
}

int kvf_connector_start_load_kv(kvf_connector* connector) {
  return guarded(connector, "kvf_connector_start_load_kv",
                 [&](KvConnector& c) { return done(connector, c.start_load_kv()); });
}

int kvf_connector_wait_for_layer_load(kvf_connector* connector, uint32_t layer) {
  return guarded(connector, "kvf_connector_wait_for_layer_load",
                 [&](KvConnector& c) { return done(connector, c.wait_for_layer_load(layer)); });
}

int kvf_connector_wait_for_load(kvf_connector* connector, uint64_t request) {
  return guarded(connector, "kvf_connector_wait_for_load",
                 [&](KvConnector& c) { return done(connector, c.wait_for_load(request)); });
}

int kvf_connector_save_kv_layer(kvf_connector* connector, uint64_t request, uint32_t layer) {
  return guarded(connector, "kvf_connector_save_kv_layer",
                 [&](KvConnector& c) { return done(connector, c.save_kv_layer(request, layer)); });
}

int kvf_connector_wait_for_save(kvf_connector* connector) {
  return guarded(connector, "kvf_connector_wait_for_save",
                 [&](KvConnector& c) { return done(connector, c.wait_for_save()); });
}

int kvf_connector_get_finished(kvf_connector* connector, uint64_t* sending, size_t sending_capacity,
                               size_t* num_sending, uint64_t* receiving, size_t receiving_capacity,
                               size_t* num_receiving) {
  constexpr const char* fn = "kvf_connector_get_finished";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (num_sending == nullptr) return fail(connector, kInvalid, null_arg(fn, "num_sending"));
    if (num_receiving == nullptr) return fail(connector, kInvalid, null_arg(fn, "num_receiving"));
    *num_sending = 0;
    *num_receiving = 0;
    if (sending == nullptr && sending_capacity != 0) {
      return fail(
          connector, kInvalid,
          std::string(fn) + ": sending is NULL with a capacity of " + std::to_string(sending_capacity));
    }
    if (receiving == nullptr && receiving_capacity != 0) {
      return fail(
          connector, kInvalid,
          std::string(fn) + ": receiving is NULL with a capacity of " + std::to_string(receiving_capacity));
    }
    std::lock_guard lock(connector->pending_mu);
    kvf::engines::FinishedRequests fresh = c.get_finished();
    hand_over(connector->pending_sending, fresh.sending, sending, sending_capacity, num_sending);
    hand_over(connector->pending_receiving, fresh.receiving, receiving, receiving_capacity, num_receiving);
    return ok(connector);
  });
}

int kvf_connector_get_block_ids_with_load_errors(kvf_connector* connector, uint32_t* blocks, size_t capacity,
                                                 size_t* num_blocks) {
  constexpr const char* fn = "kvf_connector_get_block_ids_with_load_errors";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (num_blocks == nullptr) return fail(connector, kInvalid, null_arg(fn, "num_blocks"));
    *num_blocks = 0;
    if (blocks == nullptr && capacity != 0) {
      return fail(connector, kInvalid,
                  std::string(fn) + ": blocks is NULL with a capacity of " + std::to_string(capacity));
    }
    std::lock_guard lock(connector->pending_mu);
    std::vector<uint32_t> fresh = c.get_block_ids_with_load_errors();
    hand_over(connector->pending_load_errors, fresh, blocks, capacity, num_blocks);
    return ok(connector);
  });
}

int kvf_connector_save_kv_layer_on_stream(kvf_connector* connector, uint64_t request, uint32_t layer,
                                          void* cuda_stream) {
  // CUDA's stream 0 is the legacy default stream; KvConnector takes null as "no stream", so the
  // legacy stream goes by its own handle (cudaStreamLegacy, 0x1), which records the same.
  void* stream = cuda_stream == nullptr ? kCudaStreamLegacy : cuda_stream;
  return guarded(connector, "kvf_connector_save_kv_layer_on_stream",
                 [&](KvConnector& c) { return done(connector, c.save_kv_layer(request, layer, stream)); });
}

int kvf_connector_send_kv_to(kvf_connector* connector, uint64_t request, const char* peer,
                             const void* context, size_t context_length) {
  constexpr const char* fn = "kvf_connector_send_kv_to";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (peer == nullptr) return fail(connector, kInvalid, null_arg(fn, "peer"));
    if (context == nullptr && context_length != 0) return fail(connector, kInvalid, null_arg(fn, "context"));
    const auto* bytes = static_cast<const uint8_t*>(context);
    std::vector<uint8_t> copy(bytes, bytes + context_length);
    return done(connector, c.send_kv_to(request, peer, std::move(copy)));
  });
}

int kvf_connector_wait_for_send(kvf_connector* connector, uint64_t request) {
  return guarded(connector, "kvf_connector_wait_for_send",
                 [&](KvConnector& c) { return done(connector, c.wait_for_send(request)); });
}

int kvf_connector_listen_port(const kvf_connector* connector, uint16_t* port) {
  constexpr const char* fn = "kvf_connector_listen_port";
  return guarded(const_cast<kvf_connector*>(connector), fn, [&](KvConnector& c) {
    if (port == nullptr) return fail(connector, kInvalid, null_arg(fn, "port"));
    *port = c.listen_port();
    return ok(connector);
  });
}

int kvf_connector_take_received(kvf_connector* connector, uint64_t request, kvf_connector_received** out) {
  constexpr const char* fn = "kvf_connector_take_received";
  return guarded(connector, fn, [&](KvConnector& c) {
    if (out == nullptr) return fail(connector, kInvalid, null_arg(fn, "out"));
    *out = nullptr;
    // Made before the KV is taken, so a failure to allocate it loses nothing.
    auto received = std::make_unique<kvf_connector_received>();
    auto kv = c.take_received(request);
    if (!kv.ok()) return fail(connector, kv.status());
    received->kv = std::move(kv).value();
    *out = received.release();
    return ok(connector);
  });
}

int kvf_connector_received_request(const kvf_connector_received* received, uint64_t* request) {
  constexpr const char* fn = "kvf_connector_received_request";
  if (received == nullptr) return fail_in(nullptr, kInvalid, fn, "received is NULL");
  if (request == nullptr) return fail_in(nullptr, kInvalid, fn, "request is NULL");
  *request = received->kv.request;
  return ok(nullptr);
}

int kvf_connector_received_blocks(const kvf_connector_received* received, const uint32_t** blocks,
                                  size_t* num_blocks) {
  constexpr const char* fn = "kvf_connector_received_blocks";
  if (received == nullptr) return fail_in(nullptr, kInvalid, fn, "received is NULL");
  return hand_array(fn, received->kv.blocks, blocks, num_blocks);
}

int kvf_connector_received_context(const kvf_connector_received* received, const uint8_t** context,
                                   size_t* length) {
  constexpr const char* fn = "kvf_connector_received_context";
  if (received == nullptr) return fail_in(nullptr, kInvalid, fn, "received is NULL");
  return hand_array(fn, received->kv.context, context, length);
}

int kvf_connector_received_layer_arrival_ms(const kvf_connector_received* received, const double** ms,
                                            size_t* num_layers) {
  constexpr const char* fn = "kvf_connector_received_layer_arrival_ms";
  if (received == nullptr) return fail_in(nullptr, kInvalid, fn, "received is NULL");
  return hand_array(fn, received->kv.layer_arrival_ms, ms, num_layers);
}

void kvf_connector_received_free(kvf_connector_received* received) {
  delete received;
}

}  // extern "C"
