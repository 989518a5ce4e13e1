/* kvf_router: the C ABI of kvfabric's router client (kvf::router::RouterClient), for routers not
 * written in C++. An opaque handle owns the connections to every node's kvfabricd; functions return
 * an int status (KVF_ROUTER_OK or a kvf error code) and fill caller buffers, never allocate for the
 * caller, and never block past the handle's timeout. The text of the last error on a handle:
 * kvf_router_last_error(handle).
 * Thread rules: a handle may be used from any thread; calls on one handle run one at a time. The
 * last error is the handle's, not the thread's: give each router thread its own handle (they are
 * cheap) and read kvf_router_last_error right after the call. Link: -lkvfabric_router. */
#ifndef KVF_ROUTER_KVF_ROUTER_H_
#define KVF_ROUTER_KVF_ROUTER_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KVF_ROUTER_API __attribute__((visibility("default")))
#else
#define KVF_ROUTER_API
#endif

/* Status codes: kvf::ErrorCode's values. */
enum {
  KVF_ROUTER_OK = 0,
  KVF_ROUTER_INVALID_ARGUMENT = 1,
  KVF_ROUTER_MALFORMED = 2,
  KVF_ROUTER_TIMEOUT = 4,
  KVF_ROUTER_PEER_LOST = 5, /* a daemon could not be reached */
  KVF_ROUTER_NOT_FOUND = 8,
  KVF_ROUTER_INTERNAL = 12,
  KVF_ROUTER_UNAVAILABLE = 13,      /* the daemon cannot do it (yet), e.g. move: HTTP 503 */
  KVF_ROUTER_BUFFER_TOO_SMALL = 100 /* *count/_needed says how many are needed */
};

/* A chunk key: 128 bits, as protocol::ChunkKey (hi first in its 32-digit hex form). */
typedef struct kvf_router_key {
  uint64_t hi;
  uint64_t lo;
} kvf_router_key;

#define KVF_ROUTER_NAME_MAX 64

/* One node's answer to a lookup. */
typedef struct kvf_router_node_match {
  char node[KVF_ROUTER_NAME_MAX];
  int reached; /* 1: the daemon answered; 0: down or timed out */
  int status;  /* KVF_ROUTER_OK, or why this node has no answer */
  uint64_t matched_tokens;
  uint32_t matched_chunks;
  char tier[8]; /* "gpu", "dram", "ssd" */
} kvf_router_node_match;

/* The engine best_engine picked. engine is "" when the configuration lists no engine on the node. */
typedef struct kvf_router_engine {
  char node[KVF_ROUTER_NAME_MAX];
  char engine[KVF_ROUTER_NAME_MAX];
  char role[16];
  uint64_t matched_tokens;
  uint32_t matched_chunks;
  int cached; /* 0: nothing matched anywhere; this is the fallback engine */
} kvf_router_engine;

/* One node's answer to pin/unpin/clear/health/stats (fields a call does not fill stay 0). */
typedef struct kvf_router_node_result {
  char node[KVF_ROUTER_NAME_MAX];
  int reached;
  int status;
  uint64_t changed;   /* pin/unpin: entries changed; clear: entries cleared */
  uint64_t not_found; /* pin/unpin: keys the node does not hold; clear: bytes freed */
  int healthy;        /* health */
  uint64_t entries;   /* stats */
  uint64_t pinned_entries;
  uint64_t used_bytes;
  uint64_t capacity_bytes;
} kvf_router_node_result;

typedef struct kvf_router kvf_router;

/* Creates a handle for the cluster in a topology file. timeout_ms: the limit of every call (0: 2000).
 * Returns NULL on failure and, when error_buf is not NULL, writes why (NUL-terminated). */
KVF_ROUTER_API kvf_router* kvf_router_create_from_topology(const char* topology_path, uint32_t timeout_ms,
                                                           char* error_buf, size_t error_buf_len);
/* Creates a handle for explicit daemons: nodes[i] at hosts[i]:ports[i]. With no topology the client
 * knows no models or engines: lookups send tokens and the daemons hash them. */
KVF_ROUTER_API kvf_router* kvf_router_create_from_endpoints(const char* const* nodes,
                                                            const char* const* hosts, const uint16_t* ports,
                                                            size_t count, uint32_t timeout_ms);
KVF_ROUTER_API void kvf_router_destroy(kvf_router* router);

/* The text of the last failed call on this handle ("" after a success). Valid until the next call. */
KVF_ROUTER_API const char* kvf_router_last_error(kvf_router* router);

/* Chunk keys of the full chunks of tokens. *count: in, the capacity of keys; out, how many. */
KVF_ROUTER_API int kvf_router_chunk_keys(kvf_router* router, const char* model, const uint32_t* tokens,
                                         size_t num_tokens, kvf_router_key* keys, size_t* count);

/* One entry per node asked. *count: in, capacity; out, nodes asked. query_chunks may be NULL. */
KVF_ROUTER_API int kvf_router_lookup(kvf_router* router, const char* model, const uint32_t* tokens,
                                     size_t num_tokens, kvf_router_node_match* nodes, size_t* count,
                                     uint32_t* query_chunks);
KVF_ROUTER_API int kvf_router_best_engine(kvf_router* router, const char* model, const uint32_t* tokens,
                                          size_t num_tokens, kvf_router_engine* best);

/* node: NULL or "" for every node. results/count as for lookup. The call succeeds when every
 * node was asked; look at each result's status. */
KVF_ROUTER_API int kvf_router_pin(kvf_router* router, const kvf_router_key* keys, size_t num_keys,
                                  const char* node, kvf_router_node_result* results, size_t* count);
KVF_ROUTER_API int kvf_router_unpin(kvf_router* router, const kvf_router_key* keys, size_t num_keys,
                                    const char* node, kvf_router_node_result* results, size_t* count);
/* keys NULL and num_keys 0: clear everything. */
KVF_ROUTER_API int kvf_router_clear(kvf_router* router, const kvf_router_key* keys, size_t num_keys,
                                    const char* node, kvf_router_node_result* results, size_t* count);
/* One model's entries (by its name in the daemons' topology). */
KVF_ROUTER_API int kvf_router_clear_model(kvf_router* router, const char* model, const char* node,
                                          kvf_router_node_result* results, size_t* count);
KVF_ROUTER_API int kvf_router_move(kvf_router* router, const char* from, const char* to,
                                   const kvf_router_key* keys, size_t num_keys, int copy, uint64_t* moved);
KVF_ROUTER_API int kvf_router_health(kvf_router* router, const char* node, kvf_router_node_result* results,
                                     size_t* count);
KVF_ROUTER_API int kvf_router_stats(kvf_router* router, const char* node, kvf_router_node_result* results,
                                    size_t* count);

#ifdef __cplusplus
}
#endif

#endif /* KVF_ROUTER_KVF_ROUTER_H_ */
