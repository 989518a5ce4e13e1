/* kvf_connector: the C ABI of kvfabric's engine connector (kvf::engines::KvConnector in
 * kvf/engines/kv_connector.h, which is the contract: read it for what each call means). For engines
 * not written in C++, and for FFI layers (ctypes, cffi, Rust, Go).
 *
 * Conventions:
 *  - Every function but the *_init, destroy, received_free and last_error ones returns an int
 *    status: KVF_CONNECTOR_OK (0) or a
 *    kvf::ErrorCode value (KVF_CONNECTOR_INVALID_ARGUMENT, _NOT_FOUND, _ABORTED, ...). NULL
 *    pointers and bad arguments give KVF_CONNECTOR_INVALID_ARGUMENT, never a crash. No C++
 *    exception crosses this boundary: one that escapes the connector gives KVF_CONNECTOR_INTERNAL
 *    with its what() in the message.
 *  - The message of the last failed call: kvf_connector_last_error(handle). It is kept per handle
 *    AND per calling thread, so threads sharing a handle (a scheduler thread and a worker thread)
 *    never see each other's errors. It is "" after a successful call, and the pointer stays valid
 *    until the same thread's next call on the handle (or the handle's destruction). Calls without
 *    a usable handle (a failed create, a NULL handle) keep their message per thread under
 *    kvf_connector_last_error(NULL).
 *  - Threads: as KvConnector: any function may be called from any thread; the wait_* functions
 *    block only the caller. Destroy must not race other calls on the handle.
 *  - Buffers: the layer buffers given to register_kv_caches belong to the caller and must outlive
 *    the handle. Lists (get_finished, load errors) are written into caller arrays, never allocated
 *    for the caller; see those functions for arrays that are too small (nothing is lost). The one
 *    thing handed to the caller to free is a PD request's received KV (take_received: an opaque
 *    kvf_connector_received, read through its accessors, freed with kvf_connector_received_free).
 *  - Callbacks (PD, decode side: allocate_blocks, release_blocks) run on the connector's own
 *    threads, possibly at the same time as each other and as any call; they must not destroy the
 *    handle.
 * Link: the kvf_engines library (C++: link with a C++ linker or add the C++ runtime). */
#ifndef KVF_ENGINES_KV_CONNECTOR_C_H_
#define KVF_ENGINES_KV_CONNECTOR_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KVF_CONNECTOR_API __attribute__((visibility("default")))
#else
#define KVF_CONNECTOR_API
#endif

/* Status codes: kvf::ErrorCode's values. */
enum {
  KVF_CONNECTOR_OK = 0,
  KVF_CONNECTOR_INVALID_ARGUMENT = 1, /* misuse: bad argument, layer out of range, saved twice, ... */
  KVF_CONNECTOR_MALFORMED = 2,
  KVF_CONNECTOR_UNSUPPORTED_VERSION = 3,
  KVF_CONNECTOR_TIMEOUT = 4,
  KVF_CONNECTOR_PEER_LOST = 5,
  KVF_CONNECTOR_TRANSPORT_ERROR = 6,
  KVF_CONNECTOR_OUT_OF_MEMORY = 7,
  KVF_CONNECTOR_NOT_FOUND = 8, /* an unknown request */
  KVF_CONNECTOR_ABORTED = 9,   /* a call naming an aborted request */
  KVF_CONNECTOR_AUTH_FAILED = 10,
  KVF_CONNECTOR_VERIFY_FAILED = 11,
  KVF_CONNECTOR_INTERNAL = 12,
  KVF_CONNECTOR_UNAVAILABLE = 13
};

/* Where the engine's layer buffers live (engines::LayerMemory). */
enum {
  KVF_CONNECTOR_MEMORY_AUTO = 0, /* ask CUDA: cudaMalloc'd memory takes the GPU path, else host */
  KVF_CONNECTOR_MEMORY_HOST = 1,
  KVF_CONNECTOR_MEMORY_CUDA = 2
};

/* protocol::KvLayoutKind. */
enum {
  KVF_LAYOUT_FLASH_ATTENTION = 0, /* per layer [2, num_blocks, block_tokens, kv_heads, head_dim] */
  KVF_LAYOUT_FLASH_INFER = 1,     /* per layer [num_blocks, 2, block_tokens, kv_heads, head_dim] */
  KVF_LAYOUT_MLA = 2              /* per layer [num_blocks, block_tokens, head_dim], kv_heads = 1 */
};

typedef struct kvf_connector_options {
  const char* model;     /* the model's name (part of every chunk key); required */
  uint32_t chunk_tokens; /* tokens per stored chunk, a whole number of blocks; 0: the default (256) */
  /* NULL or "": no store (every lookup matches nothing; saves only track state). Else the Unix
   * socket of the node's kvfabricd: the handle owns a store client for it (it connects on first
   * use, so the daemon may start after the engine). */
  const char* store_socket;
  int verify_loads; /* nonzero: check each loaded chunk's checksum (what C++ defaults to) */
  int memory;       /* KVF_CONNECTOR_MEMORY_* */
} kvf_connector_options;

/* protocol::KvLayoutDesc: the engine's paged KV cache layout. */
typedef struct kvf_connector_layout {
  int kind; /* KVF_LAYOUT_* */
  uint32_t num_layers;
  uint32_t num_blocks;   /* blocks per layer buffer */
  uint32_t block_tokens; /* tokens per block (page) */
  uint32_t kv_heads;
  uint32_t head_dim;
  uint32_t dtype_bytes; /* 2 for bf16/fp16, 1 for fp8, 4 for fp32 */
} kvf_connector_layout;

typedef struct kvf_connector kvf_connector;

/* Fills *opts with the C++ defaults: model NULL, chunk_tokens 256, no store, verify_loads 1,
 * memory AUTO. */
KVF_CONNECTOR_API void kvf_connector_options_init(kvf_connector_options* opts);

/* Creates a connector. On success *out is the handle (free it with kvf_connector_destroy); on
 * failure *out is NULL and kvf_connector_last_error(NULL) says why. */
KVF_CONNECTOR_API int kvf_connector_create(const kvf_connector_options* opts, kvf_connector** out);
/* Waits for the connector's current job, then frees everything (the store client too). NULL: no-op. */
KVF_CONNECTOR_API void kvf_connector_destroy(kvf_connector* connector);

/* The calling thread's last error on this handle ("" after a success); see the conventions above.
 * Never NULL. */
KVF_CONNECTOR_API const char* kvf_connector_last_error(const kvf_connector* connector);
/* "ok", "invalid_argument", "not_found", ...: the name of a status code. Never NULL. */
KVF_CONNECTOR_API const char* kvf_connector_status_name(int status);

/* --- worker, once --- */
/* layers[i]: layer i's buffer (host or one GPU's memory), num_layers == layout->num_layers. Once:
 * a second call gives KVF_CONNECTOR_INVALID_ARGUMENT. */
KVF_CONNECTOR_API int kvf_connector_register_kv_caches(kvf_connector* connector,
                                                       const kvf_connector_layout* layout,
                                                       void* const* layers, uint32_t num_layers);
/* 0 before register_kv_caches. */
KVF_CONNECTOR_API int kvf_connector_num_layers(const kvf_connector* connector, uint32_t* out);

/* --- scheduler --- */
/* tokens may be NULL only when num_tokens is 0. */
KVF_CONNECTOR_API int kvf_connector_get_num_new_matched_tokens(kvf_connector* connector, uint64_t request,
                                                               const uint32_t* tokens, size_t num_tokens,
                                                               uint64_t num_computed_tokens, uint64_t* out);
/* block_table may be NULL only when num_blocks is 0. */
KVF_CONNECTOR_API int kvf_connector_update_state_after_alloc(kvf_connector* connector, uint64_t request,
                                                             const uint32_t* block_table, size_t num_blocks,
                                                             uint64_t num_external_tokens);
/* *free_later: 1: free the blocks once get_finished lists the request as sending; 0: free now. */
KVF_CONNECTOR_API int kvf_connector_request_finished(kvf_connector* connector, uint64_t request,
                                                     int* free_later);
KVF_CONNECTOR_API int kvf_connector_abort(kvf_connector* connector, uint64_t request);

/* --- worker, per step --- */
KVF_CONNECTOR_API int kvf_connector_start_load_kv(kvf_connector* connector);
KVF_CONNECTOR_API int kvf_connector_wait_for_layer_load(kvf_connector* connector, uint32_t layer);
KVF_CONNECTOR_API int kvf_connector_wait_for_load(kvf_connector* connector, uint64_t request);
KVF_CONNECTOR_API int kvf_connector_save_kv_layer(kvf_connector* connector, uint64_t request, uint32_t layer);
KVF_CONNECTOR_API int kvf_connector_wait_for_save(kvf_connector* connector);

/* Requests whose connector work ended since the last call (receiving: loads that ended, and PD
 * requests whose KV arrived: take_received). Writes at most sending_capacity ids
 * into sending and receiving_capacity into receiving (an array may be NULL when its capacity is 0)
 * and the counts written into *num_sending / *num_receiving (both required). Ids that do not fit
 * are kept by the handle and returned first by the next call: nothing is lost; when a count equals
 * its capacity, call again until it is smaller. */
KVF_CONNECTOR_API int kvf_connector_get_finished(kvf_connector* connector, uint64_t* sending,
                                                 size_t sending_capacity, size_t* num_sending,
                                                 uint64_t* receiving, size_t receiving_capacity,
                                                 size_t* num_receiving);
/* Blocks of loads that failed since the last call (the engine recomputes them); the same pattern:
 * at most capacity written, *num_blocks the count written, the rest kept for the next call. */
KVF_CONNECTOR_API int kvf_connector_get_block_ids_with_load_errors(kvf_connector* connector, uint32_t* blocks,
                                                                   size_t capacity, size_t* num_blocks);

/* --- PD (prefill/decode disaggregation): host caches over UCX, GPU caches over cuda_ipc --- */
/* PD needs the layer buffers back to back in one allocation: layers[l] == layers[0] + l * the
 * layer's bytes (register_kv_caches accepts other caches; send_kv_to refuses them with
 * KVF_CONNECTOR_UNAVAILABLE). */

/* Layer `layer` of the request is written, its K/V writes enqueued on `cuda_stream` (a
 * cudaStream_t of the caches' GPU): the connector records an event on that stream, and a PD stream
 * or a store reads the layer only once the event has passed; the engine's stream never waits.
 * NULL is CUDA's stream 0, the legacy default stream (the event is recorded on cudaStreamLegacy);
 * code built with per-thread default streams passes cudaStreamPerThread. Otherwise as
 * kvf_connector_save_kv_layer; KVF_CONNECTOR_INVALID_ARGUMENT when the caches are host memory. */
KVF_CONNECTOR_API int kvf_connector_save_kv_layer_on_stream(kvf_connector* connector, uint64_t request,
                                                            uint32_t layer, void* cuda_stream);

/* Prefill side: the request's KV goes to the decode engine at `peer` ("host:port", "[v6]:port")
 * with `context` (context_length bytes, copied; the decode side gets them from take_received;
 * NULL only when context_length is 0), layer by layer as save_kv_layer reports each layer. Call
 * after update_state_after_alloc and before the request's first save_kv_layer. The stream runs on
 * a thread of its own; request_finished answers free_later 1 until it has ended, and
 * wait_for_send gives its outcome. KVF_CONNECTOR_INVALID_ARGUMENT: no blocks yet, sent already, a
 * layer saved already, or `peer` is not host:port; KVF_CONNECTOR_UNAVAILABLE: caches not in one
 * allocation, or GPU caches where CUDA IPC cannot run. Aborting the request ends its stream before
 * the first layer not yet saved (the decode engine never takes it as complete). */
KVF_CONNECTOR_API int kvf_connector_send_kv_to(kvf_connector* connector, uint64_t request, const char* peer,
                                               const void* context, size_t context_length);
/* Blocks until the request's stream has ended: KVF_CONNECTOR_OK once the decode engine has every
 * layer, else why not (KVF_CONNECTOR_ABORTED for an aborted request; the decode engine's refusal;
 * a peer that cannot be reached). KVF_CONNECTOR_INVALID_ARGUMENT for a request not being sent. */
KVF_CONNECTOR_API int kvf_connector_wait_for_send(kvf_connector* connector, uint64_t request);

/* Decode side: the engine's block manager, called on the connector's threads. allocate_blocks
 * writes num_blocks distinct block ids below the layout's num_blocks into blocks[] and returns 0,
 * or returns nonzero to refuse the request (no room: the prefill side's wait_for_send fails).
 * release_blocks hands back the blocks of a stream that failed (once no late write of its sender
 * can land in them; ~10 s after the failure) or that allocate_blocks got wrong. The blocks of a
 * request that arrived are not released: take_received hands them to the engine. */
typedef int (*kvf_connector_allocate_blocks_fn)(void* user_data, uint64_t request, uint32_t num_blocks,
                                                uint32_t* blocks);
typedef void (*kvf_connector_release_blocks_fn)(void* user_data, uint64_t request, const uint32_t* blocks,
                                                size_t num_blocks);

/* A separate struct (and create function), so kvf_connector_options keeps its layout. */
typedef struct kvf_connector_pd_options {
  /* Decode side: "host:port" to take prefill engines' streams on (port 0: any free port; see
   * listen_port); NULL or "": not listening. Listening starts at register_kv_caches, which fails
   * when the address is bad or taken. */
  const char* listen;
  kvf_connector_allocate_blocks_fn allocate_blocks; /* required when listening */
  kvf_connector_release_blocks_fn release_blocks;   /* required when listening */
  void* user_data;                                  /* passed to both callbacks as is */
  const char* name;                                 /* shown to peers; NULL or "": "kvfabric-engine" */
} kvf_connector_pd_options;

/* Fills *pd with: not listening, no callbacks, user_data NULL, name NULL. */
KVF_CONNECTOR_API void kvf_connector_pd_options_init(kvf_connector_pd_options* pd);
/* kvf_connector_create with PD options (pd NULL: exactly kvf_connector_create). A prefill-only
 * engine needs none: kvf_connector_send_kv_to works on any handle. */
KVF_CONNECTOR_API int kvf_connector_create_pd(const kvf_connector_options* opts,
                                              const kvf_connector_pd_options* pd, kvf_connector** out);
/* Decode side: the port listened on (0 when not listening, or before register_kv_caches). */
KVF_CONNECTOR_API int kvf_connector_listen_port(const kvf_connector* connector, uint16_t* port);

/* Decode side: a request whose KV arrived (get_finished listed it under receiving). */
typedef struct kvf_connector_received kvf_connector_received;
/* Hands the request's received KV over, once: *out is the caller's, to free with
 * kvf_connector_received_free (it does not depend on the handle: it may outlive it). On failure
 * *out is NULL: KVF_CONNECTOR_NOT_FOUND for a request that has not arrived or was taken already. */
KVF_CONNECTOR_API int kvf_connector_take_received(kvf_connector* connector, uint64_t request,
                                                  kvf_connector_received** out);
/* Accessors. Their pointers stay valid until kvf_connector_received_free; an array may be NULL
 * when its count is 0. Their errors (a NULL argument) are under kvf_connector_last_error(NULL). */
KVF_CONNECTOR_API int kvf_connector_received_request(const kvf_connector_received* received,
                                                     uint64_t* request);
/* The request's blocks in order (block i holds tokens [i*block_tokens, ...)): the engine's to use
 * and, once the request is done, to free in its block manager. */
KVF_CONNECTOR_API int kvf_connector_received_blocks(const kvf_connector_received* received,
                                                    const uint32_t** blocks, size_t* num_blocks);
/* What the prefill engine passed to send_kv_to. */
KVF_CONNECTOR_API int kvf_connector_received_context(const kvf_connector_received* received,
                                                     const uint8_t** context, size_t* length);
/* Per layer, milliseconds from the stream's acceptance to the layer's arrival. */
KVF_CONNECTOR_API int kvf_connector_received_layer_arrival_ms(const kvf_connector_received* received,
                                                              const double** ms, size_t* num_layers);
/* NULL: no-op. */
KVF_CONNECTOR_API void kvf_connector_received_free(kvf_connector_received* received);

#ifdef __cplusplus
}
#endif

#endif /* KVF_ENGINES_KV_CONNECTOR_C_H_ */
