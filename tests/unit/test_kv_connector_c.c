/* The engine connector's C ABI (kvf/engines/kv_connector_c.h) used from C, without a store: create,
 * register host caches, a lookup that matches nothing, the step flow (update, save every layer,
 * finish), the misuse errors (each with its code and a message, the handle serving on after each),
 * NULL and bad arguments, and get_finished's arrays that are too small losing nothing. Then PD on
 * host memory: a prefill and a decode connector in this process over UCX on loopback, the decode
 * side's block manager in C callbacks; random bytes land in poisoned decode blocks, every byte and
 * the context checked, nothing else touched; an abort, refusals by the block manager and the PD
 * misuse errors (unknown request, send before alloc, bad addresses).
 * Compiled as C11 (so the header is proven to be C); exits 0 only when every check passed. */
#define _POSIX_C_SOURCE 200809L /* nanosleep, in a C11 build without extensions */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvf/engines/kv_connector_c.h"

static int failures = 0;

#define CHECK(cond, ...)      \
  do {                        \
    if (cond) {               \
      printf("ok: ");         \
    } else {                  \
      printf("FAIL: ");       \
      ++failures;             \
    }                         \
    printf(__VA_ARGS__);      \
    printf(" [%s]\n", #cond); \
  } while (0)

/* The call gave `want`, with a non-empty message. */
#define CHECK_ERR(c, call, want, what)                                                   \
  do {                                                                                   \
    int rc_ = (call);                                                                    \
    const char* msg_ = kvf_connector_last_error(c);                                      \
    CHECK(rc_ == (want) && msg_ != NULL && msg_[0] != '\0', "%s: %s (%d), \"%s\"", what, \
          kvf_connector_status_name(rc_), rc_, msg_ ? msg_ : "(null)");                  \
  } while (0)

#define CHECK_OK(c, call, what)                                                                   \
  do {                                                                                            \
    int rc_ = (call);                                                                             \
    CHECK(rc_ == KVF_CONNECTOR_OK && kvf_connector_last_error(c)[0] == '\0', "%s (%s: %s)", what, \
          kvf_connector_status_name(rc_), kvf_connector_last_error(c));                           \
  } while (0)

enum { kLayers = 3, kBlocks = 32, kBlockTokens = 16, kChunkTokens = 32, kPrompt = 100 };

/* A new request: asks (no store: 0 matched) and gets its blocks, with nothing to load. */
static void admit(kvf_connector* c, uint64_t request, const uint32_t* prompt, const uint32_t* blocks,
                  size_t num_blocks) {
  uint64_t matched = 99;
  CHECK_OK(c, kvf_connector_get_num_new_matched_tokens(c, request, prompt, kPrompt, 0, &matched),
           "lookup of a new request");
  CHECK(matched == 0, "no store: the lookup matches nothing (got %llu)", (unsigned long long)matched);
  CHECK_OK(c, kvf_connector_update_state_after_alloc(c, request, blocks, num_blocks, 0),
           "update_state_after_alloc");
}

/* --- PD on host memory ------------------------------------------------------------------------- */

enum { kPdLayers = 3, kPdBlocks = 32, kPdBlockTokens = 16, kPdKvHeads = 2, kPdHeadDim = 64 };
/* FLASH_ATTENTION: per layer [2, num_blocks, block_tokens, kv_heads, head_dim] of 2-byte values. */
#define PD_PART_BYTES ((size_t)kPdBlockTokens * kPdKvHeads * kPdHeadDim * 2)
#define PD_LAYER_BYTES ((size_t)2 * kPdBlocks * PD_PART_BYTES)
#define PD_POISON 0xA5

/* The decode engine's block manager: hands out a shuffled free list; its mode is set by the test. */
enum { kAllocNormal = 0, kAllocRefuse = 1, kAllocOutOfRange = 2 };
typedef struct block_manager {
  uint32_t free_list[kPdBlocks];
  size_t next; /* touched by allocate_blocks only (the receiver's thread) */
  atomic_int mode;
  atomic_int allocations;
  atomic_int releases;
  atomic_ullong last_released_request;
} block_manager;

static int pd_allocate(void* user_data, uint64_t request, uint32_t num_blocks, uint32_t* blocks) {
  block_manager* m = (block_manager*)user_data;
  (void)request;
  atomic_fetch_add(&m->allocations, 1);
  const int mode = atomic_load(&m->mode);
  if (mode == kAllocRefuse || m->next + num_blocks > kPdBlocks) return 1;
  for (uint32_t i = 0; i < num_blocks; ++i) {
    blocks[i] = mode == kAllocOutOfRange ? (uint32_t)kPdBlocks + i : m->free_list[m->next + i];
  }
  if (mode == kAllocNormal) m->next += num_blocks;
  return 0;
}

static void pd_release(void* user_data, uint64_t request, const uint32_t* blocks, size_t num_blocks) {
  block_manager* m = (block_manager*)user_data;
  (void)blocks;
  (void)num_blocks;
  atomic_store(&m->last_released_request, (unsigned long long)request);
  atomic_fetch_add(&m->releases, 1);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_random(void) { /* xorshift64 */
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Polls the decode side's get_finished (up to wait_ms) until `request` is listed under receiving. */
static int wait_received(kvf_connector* d, uint64_t request, long wait_ms) {
  for (long waited = 0; waited <= wait_ms; waited += 5) {
    uint64_t sending[8], receiving[8];
    size_t ns = 0, nr = 0;
    if (kvf_connector_get_finished(d, sending, 8, &ns, receiving, 8, &nr) != KVF_CONNECTOR_OK) return 0;
    for (size_t i = 0; i < nr; ++i)
      if (receiving[i] == request) return 1;
    sleep_ms(5);
  }
  return 0;
}

/* A prefill request: lookup and blocks. */
static void pd_admit(kvf_connector* p, uint64_t request, const uint32_t* prompt, const uint32_t* blocks,
                     size_t num_blocks) {
  uint64_t matched = 0;
  CHECK_OK(p, kvf_connector_get_num_new_matched_tokens(p, request, prompt, kPrompt, 0, &matched),
           "PD prefill: lookup");
  CHECK_OK(p, kvf_connector_update_state_after_alloc(p, request, blocks, num_blocks, 0),
           "PD prefill: update_state_after_alloc");
}

static void test_pd(const uint32_t* prompt) {
  printf("--- PD on host memory ---\n");
  kvf_connector_options opts;
  kvf_connector_options_init(&opts);
  opts.model = "c-abi-pd";
  opts.chunk_tokens = kChunkTokens;
  opts.memory = KVF_CONNECTOR_MEMORY_HOST;
  kvf_connector_layout layout = {
      KVF_LAYOUT_FLASH_ATTENTION, kPdLayers, kPdBlocks, kPdBlockTokens, kPdKvHeads, kPdHeadDim, 2};

  /* One allocation per side, layer l at l * layer bytes: the prefill's random, the decode's poisoned. */
  uint8_t* prefill_pool = malloc(kPdLayers * PD_LAYER_BYTES);
  uint8_t* decode_pool = malloc(kPdLayers * PD_LAYER_BYTES);
  if (prefill_pool == NULL || decode_pool == NULL) {
    CHECK(0, "PD: no memory for the pools");
    return;
  }
  for (size_t i = 0; i < kPdLayers * PD_LAYER_BYTES; ++i) prefill_pool[i] = (uint8_t)(next_random() >> 32);
  memset(decode_pool, PD_POISON, kPdLayers * PD_LAYER_BYTES);
  void* prefill_layers[kPdLayers];
  void* decode_layers[kPdLayers];
  for (int l = 0; l < kPdLayers; ++l) {
    prefill_layers[l] = prefill_pool + (size_t)l * PD_LAYER_BYTES;
    decode_layers[l] = decode_pool + (size_t)l * PD_LAYER_BYTES;
  }

  block_manager manager;
  memset(&manager, 0, sizeof manager);
  for (uint32_t i = 0; i < kPdBlocks; ++i) manager.free_list[i] = i;
  for (uint32_t i = kPdBlocks - 1; i > 0; --i) { /* shuffled: the decode blocks differ from the prefill's */
    const uint32_t j = (uint32_t)(next_random() % (i + 1));
    const uint32_t t = manager.free_list[i];
    manager.free_list[i] = manager.free_list[j];
    manager.free_list[j] = t;
  }
  atomic_init(&manager.mode, kAllocNormal);
  atomic_init(&manager.allocations, 0);
  atomic_init(&manager.releases, 0);
  atomic_init(&manager.last_released_request, 0ull);

  /* --- the decode connector: create_pd's checks, then listening from register_kv_caches on --- */
  kvf_connector_pd_options pd;
  kvf_connector_pd_options_init(&pd);
  CHECK(pd.listen == NULL && pd.allocate_blocks == NULL && pd.release_blocks == NULL && pd.name == NULL,
        "pd_options_init: not listening, no callbacks");
  kvf_connector* d = NULL;
  pd.listen = "127.0.0.1:0";
  CHECK_ERR(NULL, kvf_connector_create_pd(&opts, &pd, &d), KVF_CONNECTOR_INVALID_ARGUMENT,
            "create_pd listening without the block manager callbacks");
  CHECK(d == NULL, "a failed create_pd leaves *out NULL");
  pd.allocate_blocks = pd_allocate;
  pd.release_blocks = pd_release;
  pd.user_data = &manager;
  pd.name = "c-abi-decode";
  pd.listen = "no-port-here";
  kvf_connector* bad = NULL;
  CHECK_OK(NULL, kvf_connector_create_pd(&opts, &pd, &bad), "create_pd with a bad listen address");
  if (bad != NULL) {
    CHECK_ERR(bad, kvf_connector_register_kv_caches(bad, &layout, decode_layers, kPdLayers),
              KVF_CONNECTOR_INVALID_ARGUMENT, "register_kv_caches: the bad listen address is refused there");
    kvf_connector_destroy(bad);
  }
  pd.listen = "127.0.0.1:0";
  CHECK_OK(NULL, kvf_connector_create_pd(&opts, &pd, &d), "create_pd: the decode connector");
  kvf_connector* p = NULL;
  CHECK_OK(NULL, kvf_connector_create_pd(&opts, NULL, &p), "create_pd with NULL pd options: the prefill one");
  if (d == NULL || p == NULL) {
    kvf_connector_destroy(d);
    kvf_connector_destroy(p);
    free(prefill_pool);
    free(decode_pool);
    return;
  }
  uint16_t port = 1;
  CHECK_OK(d, kvf_connector_listen_port(d, &port), "listen_port before registering");
  CHECK(port == 0, "not listening before register_kv_caches (port %u)", (unsigned)port);
  CHECK_OK(d, kvf_connector_register_kv_caches(d, &layout, decode_layers, kPdLayers), "decode: register");
  CHECK_OK(d, kvf_connector_listen_port(d, &port), "decode: listen_port");
  CHECK(port != 0, "decode: listening on port %u", (unsigned)port);
  CHECK_ERR(d, kvf_connector_listen_port(d, NULL), KVF_CONNECTOR_INVALID_ARGUMENT, "listen_port with NULL");
  CHECK_OK(p, kvf_connector_register_kv_caches(p, &layout, prefill_layers, kPdLayers), "prefill: register");
  uint16_t prefill_port = 1;
  CHECK_OK(p, kvf_connector_listen_port(p, &prefill_port), "prefill: listen_port");
  CHECK(prefill_port == 0, "the prefill connector does not listen (port %u)", (unsigned)prefill_port);
  char peer[64];
  snprintf(peer, sizeof peer, "127.0.0.1:%u", (unsigned)port);

  /* --- request 1: misuse first, then the whole stream --- */
  const uint32_t blocks1[7] = {3, 9, 4, 20, 11, 5, 30};
  const uint8_t context[] = {'c', 't', 'x', 0, 0xFF, 7, 'e', 'n', 'd'}; /* a NUL inside: length counts */
  uint64_t matched = 0;
  CHECK_OK(p, kvf_connector_get_num_new_matched_tokens(p, 1, prompt, kPrompt, 0, &matched), "PD: lookup");
  CHECK_ERR(p, kvf_connector_send_kv_to(p, 1, peer, context, sizeof context), KVF_CONNECTOR_INVALID_ARGUMENT,
            "send_kv_to before update_state_after_alloc");
  CHECK_ERR(p, kvf_connector_send_kv_to(p, 4242, peer, NULL, 0), KVF_CONNECTOR_NOT_FOUND,
            "send_kv_to for an unknown request");
  CHECK_OK(p, kvf_connector_update_state_after_alloc(p, 1, blocks1, 7, 0), "PD: update_state_after_alloc");
  CHECK_ERR(p, kvf_connector_send_kv_to(p, 1, "no-port", NULL, 0), KVF_CONNECTOR_INVALID_ARGUMENT,
            "send_kv_to a peer that is not host:port");
  CHECK_ERR(p, kvf_connector_send_kv_to(p, 1, NULL, NULL, 0), KVF_CONNECTOR_INVALID_ARGUMENT,
            "send_kv_to a NULL peer");
  CHECK_ERR(p, kvf_connector_send_kv_to(p, 1, peer, NULL, 3), KVF_CONNECTOR_INVALID_ARGUMENT,
            "send_kv_to with a NULL context of 3 bytes");
  CHECK_ERR(p, kvf_connector_wait_for_send(p, 1), KVF_CONNECTOR_INVALID_ARGUMENT,
            "wait_for_send for a request not being sent");
  CHECK_ERR(p, kvf_connector_wait_for_send(p, 4242), KVF_CONNECTOR_NOT_FOUND,
            "wait_for_send for an unknown request");
  CHECK_ERR(p, kvf_connector_save_kv_layer_on_stream(p, 1, 0, NULL), KVF_CONNECTOR_INVALID_ARGUMENT,
            "save_kv_layer_on_stream with host caches");
  CHECK_OK(p, kvf_connector_send_kv_to(p, 1, peer, context, sizeof context),
           "send_kv_to the decode connector");
  CHECK_ERR(p, kvf_connector_send_kv_to(p, 1, peer, NULL, 0), KVF_CONNECTOR_INVALID_ARGUMENT,
            "send_kv_to twice");
  for (uint32_t l = 0; l < kPdLayers; ++l)
    CHECK_OK(p, kvf_connector_save_kv_layer(p, 1, l), "PD: save layer");
  CHECK_OK(p, kvf_connector_wait_for_send(p, 1), "wait_for_send: the decode side has every layer");
  CHECK(wait_received(d, 1, 10000), "decode: get_finished lists request 1 under receiving");

  kvf_connector_received* r = (kvf_connector_received*)&manager; /* poisoned: set to NULL on failure */
  CHECK_ERR(d, kvf_connector_take_received(d, 4242, &r), KVF_CONNECTOR_NOT_FOUND,
            "take_received for a request that did not arrive");
  CHECK(r == NULL, "a failed take_received leaves *out NULL");
  CHECK_ERR(d, kvf_connector_take_received(d, 1, NULL), KVF_CONNECTOR_INVALID_ARGUMENT,
            "take_received with NULL out");
  CHECK_OK(d, kvf_connector_take_received(d, 1, &r), "take_received");
  kvf_connector_received* again = NULL;
  CHECK_ERR(d, kvf_connector_take_received(d, 1, &again), KVF_CONNECTOR_NOT_FOUND, "take_received twice");
  if (r != NULL) {
    uint64_t got_request = 0;
    const uint32_t* rb = NULL;
    const uint8_t* rc = NULL;
    const double* arrival = NULL;
    size_t nb = 0, nc = 0, nl = 0;
    CHECK_OK(NULL, kvf_connector_received_request(r, &got_request), "received_request");
    CHECK(got_request == 1, "the received KV is request 1's (got %llu)", (unsigned long long)got_request);
    CHECK_OK(NULL, kvf_connector_received_blocks(r, &rb, &nb), "received_blocks");
    CHECK_OK(NULL, kvf_connector_received_context(r, &rc, &nc), "received_context");
    CHECK_OK(NULL, kvf_connector_received_layer_arrival_ms(r, &arrival, &nl), "received_layer_arrival_ms");
    CHECK(nc == sizeof context && rc != NULL && memcmp(rc, context, sizeof context) == 0,
          "the context's %zu bytes arrived as sent (got %zu)", sizeof context, nc);
    CHECK(nl == kPdLayers && arrival != NULL && arrival[0] >= 0.0, "an arrival time per layer (%zu)", nl);
    CHECK(nb == 7 && rb != NULL, "7 blocks, as many as the prefill's table (got %zu)", nb);
    if (nb == 7 && rb != NULL) {
      int from_manager = 1;
      for (size_t i = 0; i < nb; ++i) from_manager = from_manager && rb[i] == manager.free_list[i];
      CHECK(from_manager, "the blocks are the ones allocate_blocks gave, in order");
      int same = 1, poisoned = 1;
      unsigned char received_block[kPdBlocks] = {0};
      for (size_t i = 0; i < nb; ++i) received_block[rb[i]] = 1;
      for (size_t l = 0; l < kPdLayers; ++l) {
        for (size_t part = 0; part < 2; ++part) {
          for (size_t i = 0; i < nb; ++i) {
            const uint8_t* src =
                prefill_pool + l * PD_LAYER_BYTES + (part * kPdBlocks + blocks1[i]) * PD_PART_BYTES;
            const uint8_t* dst =
                decode_pool + l * PD_LAYER_BYTES + (part * kPdBlocks + rb[i]) * PD_PART_BYTES;
            same = same && memcmp(src, dst, PD_PART_BYTES) == 0;
          }
          for (size_t b = 0; b < kPdBlocks; ++b) {
            if (received_block[b]) continue;
            const uint8_t* other = decode_pool + l * PD_LAYER_BYTES + (part * kPdBlocks + b) * PD_PART_BYTES;
            for (size_t k = 0; k < PD_PART_BYTES; ++k) poisoned = poisoned && other[k] == PD_POISON;
          }
        }
      }
      CHECK(same, "every K and V byte of the 7 blocks, every layer, equals the prefill's random bytes");
      CHECK(poisoned, "every other decode block is still poisoned");
    }
    CHECK_ERR(NULL, kvf_connector_received_blocks(r, NULL, &nb), KVF_CONNECTOR_INVALID_ARGUMENT,
              "received_blocks with a NULL array pointer");
    CHECK_ERR(NULL, kvf_connector_received_context(r, &rc, NULL), KVF_CONNECTOR_INVALID_ARGUMENT,
              "received_context with a NULL length");
    CHECK_ERR(NULL, kvf_connector_received_request(NULL, &got_request), KVF_CONNECTOR_INVALID_ARGUMENT,
              "received_request(NULL)");
    CHECK_ERR(NULL, kvf_connector_received_layer_arrival_ms(NULL, &arrival, &nl),
              KVF_CONNECTOR_INVALID_ARGUMENT, "received_layer_arrival_ms(NULL)");
    kvf_connector_received_free(r);
  }
  kvf_connector_received_free(NULL); /* a no-op */
  int free_later = 7;
  CHECK_OK(p, kvf_connector_request_finished(p, 1, &free_later), "prefill: request 1 finished");
  CHECK(free_later == 0, "its stream has ended: free the blocks now (free_later %d)", free_later);

  /* --- request 2: aborted after one layer; the decode side never lists it --- */
  const uint32_t blocks2[7] = {0, 1, 2, 6, 7, 8, 10};
  pd_admit(p, 2, prompt, blocks2, 7);
  CHECK_OK(p, kvf_connector_send_kv_to(p, 2, peer, NULL, 0), "request 2: send_kv_to (no context)");
  CHECK_OK(p, kvf_connector_save_kv_layer(p, 2, 0), "request 2: save layer 0");
  CHECK_OK(p, kvf_connector_abort(p, 2), "request 2: abort");
  CHECK_ERR(p, kvf_connector_wait_for_send(p, 2), KVF_CONNECTOR_ABORTED, "wait_for_send after abort");
  CHECK(!wait_received(d, 2, 500), "decode: the aborted request is never listed as received");
  CHECK_OK(p, kvf_connector_request_finished(p, 2, &free_later), "request 2 finished");

  /* --- the block manager refuses request 3, and gets request 4's blocks wrong --- */
  atomic_store(&manager.mode, kAllocRefuse);
  pd_admit(p, 3, prompt, blocks1, 7);
  CHECK_OK(p, kvf_connector_send_kv_to(p, 3, peer, NULL, 0), "request 3: send_kv_to");
  for (uint32_t l = 0; l < kPdLayers; ++l)
    CHECK_OK(p, kvf_connector_save_kv_layer(p, 3, l), "request 3: save");
  int rc3 = kvf_connector_wait_for_send(p, 3);
  CHECK(rc3 != KVF_CONNECTOR_OK && kvf_connector_last_error(p)[0] != '\0',
        "request 3: allocate_blocks refused it, so the send fails: %s, \"%s\"",
        kvf_connector_status_name(rc3), kvf_connector_last_error(p));
  atomic_store(&manager.mode, kAllocOutOfRange);
  pd_admit(p, 4, prompt, blocks1, 7);
  CHECK_OK(p, kvf_connector_send_kv_to(p, 4, peer, NULL, 0), "request 4: send_kv_to");
  for (uint32_t l = 0; l < kPdLayers; ++l)
    CHECK_OK(p, kvf_connector_save_kv_layer(p, 4, l), "request 4: save");
  int rc4 = kvf_connector_wait_for_send(p, 4);
  CHECK(rc4 != KVF_CONNECTOR_OK, "request 4: blocks out of range are refused: %s, \"%s\"",
        kvf_connector_status_name(rc4), kvf_connector_last_error(p));
  for (int i = 0; i < 400 && atomic_load(&manager.releases) == 0; ++i) sleep_ms(5);
  CHECK(atomic_load(&manager.releases) >= 1 && atomic_load(&manager.last_released_request) == 4,
        "release_blocks got request 4's wrong blocks back (%d releases)", atomic_load(&manager.releases));
  CHECK(!wait_received(d, 3, 0) && !wait_received(d, 4, 0), "decode: neither is listed as received");
  atomic_store(&manager.mode, kAllocNormal);

  /* --- request 5: a peer nobody listens on --- */
  pd_admit(p, 5, prompt, blocks1, 7);
  CHECK_OK(p, kvf_connector_send_kv_to(p, 5, "127.0.0.1:1", NULL, 0), "request 5: send_kv_to port 1");
  for (uint32_t l = 0; l < kPdLayers; ++l)
    CHECK_OK(p, kvf_connector_save_kv_layer(p, 5, l), "request 5: save");
  int rc5 = kvf_connector_wait_for_send(p, 5);
  CHECK(rc5 != KVF_CONNECTOR_OK, "request 5: an unreachable peer fails the send: %s, \"%s\"",
        kvf_connector_status_name(rc5), kvf_connector_last_error(p));
  for (uint64_t id = 3; id <= 5; ++id)
    CHECK_OK(p, kvf_connector_request_finished(p, id, &free_later), "requests 3-5 finished");

  /* --- still serving: request 6 goes through, with a context of one byte --- */
  pd_admit(p, 6, prompt, blocks2, 7);
  const uint8_t one = 42;
  CHECK_OK(p, kvf_connector_send_kv_to(p, 6, peer, &one, 1), "request 6: send_kv_to");
  for (uint32_t l = 0; l < kPdLayers; ++l)
    CHECK_OK(p, kvf_connector_save_kv_layer(p, 6, l), "request 6: save");
  CHECK_OK(p, kvf_connector_wait_for_send(p, 6), "request 6: wait_for_send");
  CHECK(wait_received(d, 6, 10000), "decode: request 6 arrived");
  kvf_connector_received* r6 = NULL;
  CHECK_OK(d, kvf_connector_take_received(d, 6, &r6), "take_received(6)");
  if (r6 != NULL) {
    const uint8_t* rc = NULL;
    size_t nc = 0;
    CHECK_OK(NULL, kvf_connector_received_context(r6, &rc, &nc), "received_context(6)");
    CHECK(nc == 1 && rc != NULL && rc[0] == 42, "request 6's one-byte context");
  }
  kvf_connector_destroy(d); /* the received KV does not depend on the handle */
  d = NULL;
  if (r6 != NULL) {
    size_t nb = 0;
    const uint32_t* rb = NULL;
    CHECK_OK(NULL, kvf_connector_received_blocks(r6, &rb, &nb), "received_blocks(6) after destroy");
    CHECK(nb == 7, "request 6 had 7 blocks (got %zu)", nb);
    kvf_connector_received_free(r6);
  }
  CHECK_OK(p, kvf_connector_request_finished(p, 6, &free_later), "request 6 finished");

  kvf_connector_destroy(d);
  kvf_connector_destroy(p);
  free(prefill_pool);
  free(decode_pool);
}

int main(void) {
  /* --- create: bad arguments, then a connector without a store --- */
  kvf_connector_options opts;
  kvf_connector_options_init(&opts);
  CHECK(opts.verify_loads == 1 && opts.chunk_tokens == 256 && opts.store_socket == NULL,
        "options_init: defaults");
  kvf_connector* c = (kvf_connector*)&opts; /* poisoned: create must set it to NULL on failure */
  CHECK_ERR(NULL, kvf_connector_create(&opts, &c), KVF_CONNECTOR_INVALID_ARGUMENT, "create without a model");
  CHECK(c == NULL, "a failed create leaves *out NULL");
  CHECK_ERR(NULL, kvf_connector_create(NULL, &c), KVF_CONNECTOR_INVALID_ARGUMENT, "create with NULL options");
  CHECK_ERR(NULL, kvf_connector_create(&opts, NULL), KVF_CONNECTOR_INVALID_ARGUMENT, "create with NULL out");
  opts.model = "c-abi-test";
  opts.memory = 7;
  CHECK_ERR(NULL, kvf_connector_create(&opts, &c), KVF_CONNECTOR_INVALID_ARGUMENT, "create with memory 7");
  opts.memory = KVF_CONNECTOR_MEMORY_HOST;
  opts.chunk_tokens = kChunkTokens;
  opts.store_socket = ""; /* "" as NULL: no store */
  CHECK_OK(NULL, kvf_connector_create(&opts, &c), "create without a store");
  if (c == NULL) {
    printf("FAIL: no connector; stopping\n");
    return 1;
  }

  /* --- calls on a NULL handle --- */
  CHECK_ERR(NULL, kvf_connector_start_load_kv(NULL), KVF_CONNECTOR_INVALID_ARGUMENT, "start_load_kv(NULL)");
  CHECK_ERR(NULL, kvf_connector_wait_for_save(NULL), KVF_CONNECTOR_INVALID_ARGUMENT, "wait_for_save(NULL)");
  kvf_connector_destroy(NULL); /* a no-op */

  /* --- before registering --- */
  uint32_t prompt[kPrompt];
  for (size_t i = 0; i < kPrompt; ++i) prompt[i] = (uint32_t)(1000 + i * 7);
  uint64_t matched = 0;
  CHECK_ERR(c, kvf_connector_get_num_new_matched_tokens(c, 1, prompt, kPrompt, 0, &matched),
            KVF_CONNECTOR_INVALID_ARGUMENT, "lookup before register_kv_caches");
  uint32_t layers_now = 99;
  CHECK_OK(c, kvf_connector_num_layers(c, &layers_now), "num_layers before registering");
  CHECK(layers_now == 0, "num_layers is 0 before registering (got %u)", layers_now);

  /* --- register host caches --- */
  kvf_connector_layout layout = {KVF_LAYOUT_FLASH_ATTENTION, kLayers, kBlocks, kBlockTokens, 2, 64, 2};
  const size_t layer_bytes = (size_t)2 * kBlocks * kBlockTokens * 2 * 64 * 2;
  void* layers[kLayers];
  for (int l = 0; l < kLayers; ++l) {
    layers[l] = malloc(layer_bytes);
    if (layers[l] == NULL) return 1;
    memset(layers[l], 0, layer_bytes);
  }
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, NULL, layers, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "register with a NULL layout");
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, &layout, NULL, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "register with NULL layers");
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, &layout, layers, kLayers - 1),
            KVF_CONNECTOR_INVALID_ARGUMENT, "register with too few layer buffers");
  layout.kind = 9;
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, &layout, layers, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "register an unknown layout kind");
  layout.kind = KVF_LAYOUT_FLASH_ATTENTION;
  layout.head_dim = 0;
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, &layout, layers, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "register a layout with head_dim 0");
  layout.head_dim = 64;
  void* with_null[kLayers] = {layers[0], NULL, layers[2]};
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, &layout, with_null, kLayers),
            KVF_CONNECTOR_INVALID_ARGUMENT, "register with a NULL layer buffer");
  CHECK_OK(c, kvf_connector_register_kv_caches(c, &layout, layers, kLayers), "register_kv_caches");
  CHECK_OK(c, kvf_connector_num_layers(c, &layers_now), "num_layers");
  CHECK(layers_now == kLayers, "num_layers is %d (got %u)", kLayers, layers_now);
  CHECK_ERR(c, kvf_connector_register_kv_caches(c, &layout, layers, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "register twice");

  /* --- the step flow for request 1: lookup (0), update, save every layer, finish --- */
  uint32_t blocks1[7] = {3, 9, 4, 20, 11, 5, 30}; /* 7 blocks of 16 hold the 100 tokens */
  admit(c, 1, prompt, blocks1, 7);
  CHECK_OK(c, kvf_connector_start_load_kv(c), "start_load_kv (nothing to load)");
  CHECK_OK(c, kvf_connector_wait_for_load(c, 1), "wait_for_load: nothing to load, Ok at once");
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK_OK(c, kvf_connector_wait_for_layer_load(c, l), "wait_for_layer_load");
    CHECK_OK(c, kvf_connector_save_kv_layer(c, 1, l), "save_kv_layer");
  }
  CHECK_OK(c, kvf_connector_wait_for_save(c), "wait_for_save");
  int free_later = 7;
  CHECK_OK(c, kvf_connector_request_finished(c, 1, &free_later), "request_finished");
  CHECK(free_later == 0, "no store, nothing pending: free the blocks now (free_later %d)", free_later);
  size_t ns = 99, nr = 99;
  uint64_t sending[4], receiving[4];
  CHECK_OK(c, kvf_connector_get_finished(c, sending, 4, &ns, receiving, 4, &nr), "get_finished");
  CHECK(ns == 0 && nr == 0, "nothing was pending (sending %zu, receiving %zu)", ns, nr);
  uint32_t bad_blocks[4];
  size_t nb = 99;
  CHECK_OK(c, kvf_connector_get_block_ids_with_load_errors(c, bad_blocks, 4, &nb), "load errors");
  CHECK(nb == 0, "no load errors (got %zu)", nb);
  CHECK_OK(c, kvf_connector_get_finished(c, NULL, 0, &ns, NULL, 0, &nr), "get_finished with no room");

  /* --- misuse: each gives its code and a message, and the handle keeps working --- */
  uint32_t blocks2[7] = {0, 1, 2, 6, 7, 8, 10};
  admit(c, 2, prompt, blocks2, 7);
  CHECK_ERR(c, kvf_connector_save_kv_layer(c, 12345, 0), KVF_CONNECTOR_NOT_FOUND,
            "save for an unknown request");
  CHECK_ERR(c, kvf_connector_wait_for_load(c, 12345), KVF_CONNECTOR_NOT_FOUND,
            "wait_for_load, unknown request");
  CHECK_ERR(c, kvf_connector_abort(c, 12345), KVF_CONNECTOR_NOT_FOUND, "abort an unknown request");
  CHECK_ERR(c, kvf_connector_request_finished(c, 1, &free_later), KVF_CONNECTOR_NOT_FOUND,
            "finish a forgotten request");
  CHECK_OK(c, kvf_connector_save_kv_layer(c, 2, 0), "the handle serves on: save layer 0 of request 2");
  CHECK_ERR(c, kvf_connector_save_kv_layer(c, 2, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "save a layer out of range");
  CHECK_ERR(c, kvf_connector_wait_for_layer_load(c, kLayers), KVF_CONNECTOR_INVALID_ARGUMENT,
            "wait_for_layer_load out of range");
  CHECK_OK(c, kvf_connector_save_kv_layer(c, 2, 1), "the handle serves on: save layer 1");
  CHECK_ERR(c, kvf_connector_save_kv_layer(c, 2, 1), KVF_CONNECTOR_INVALID_ARGUMENT, "save layer 1 twice");
  CHECK_OK(c, kvf_connector_save_kv_layer(c, 2, 2), "the handle serves on: save layer 2");
  CHECK_OK(c, kvf_connector_wait_for_save(c), "wait_for_save");

  admit(c, 3, prompt, blocks1, 7);
  CHECK_OK(c, kvf_connector_abort(c, 3), "abort request 3");
  CHECK_ERR(c, kvf_connector_save_kv_layer(c, 3, 0), KVF_CONNECTOR_ABORTED, "save after abort");
  CHECK_ERR(c, kvf_connector_wait_for_load(c, 3), KVF_CONNECTOR_ABORTED, "wait_for_load after abort");
  CHECK_ERR(c, kvf_connector_update_state_after_alloc(c, 3, blocks1, 7, 0), KVF_CONNECTOR_ABORTED,
            "update after abort");
  CHECK_ERR(c, kvf_connector_get_num_new_matched_tokens(c, 3, prompt, kPrompt, 0, &matched),
            KVF_CONNECTOR_ABORTED, "lookup after abort");
  CHECK_OK(c, kvf_connector_request_finished(c, 3, &free_later), "an aborted request is forgotten at finish");
  CHECK_OK(c, kvf_connector_request_finished(c, 2, &free_later), "the handle serves on: finish request 2");

  /* --- NULL and bad arguments on a live handle --- */
  CHECK_ERR(c, kvf_connector_get_num_new_matched_tokens(c, 4, NULL, kPrompt, 0, &matched),
            KVF_CONNECTOR_INVALID_ARGUMENT, "lookup with NULL tokens");
  CHECK_ERR(c, kvf_connector_get_num_new_matched_tokens(c, 4, prompt, kPrompt, 0, NULL),
            KVF_CONNECTOR_INVALID_ARGUMENT, "lookup with NULL out");
  CHECK_ERR(c, kvf_connector_get_num_new_matched_tokens(c, 4, prompt, kPrompt, kPrompt + 1, &matched),
            KVF_CONNECTOR_INVALID_ARGUMENT, "lookup with more computed tokens than the prompt");
  CHECK_ERR(c, kvf_connector_update_state_after_alloc(c, 4, NULL, 3, 0), KVF_CONNECTOR_INVALID_ARGUMENT,
            "update with a NULL block table");
  CHECK_ERR(c, kvf_connector_request_finished(c, 4, NULL), KVF_CONNECTOR_INVALID_ARGUMENT,
            "request_finished with NULL free_later");
  CHECK_ERR(c, kvf_connector_get_finished(c, NULL, 4, &ns, receiving, 4, &nr), KVF_CONNECTOR_INVALID_ARGUMENT,
            "get_finished with a NULL array of capacity 4");
  CHECK_ERR(c, kvf_connector_get_finished(c, sending, 4, NULL, receiving, 4, &nr),
            KVF_CONNECTOR_INVALID_ARGUMENT, "get_finished with NULL num_sending");
  CHECK_ERR(c, kvf_connector_get_block_ids_with_load_errors(c, bad_blocks, 4, NULL),
            KVF_CONNECTOR_INVALID_ARGUMENT, "load errors with NULL num_blocks");
  CHECK_ERR(c, kvf_connector_num_layers(c, NULL), KVF_CONNECTOR_INVALID_ARGUMENT, "num_layers with NULL out");

  /* The last error is per thread and per handle: another handle's failure does not show here. */
  kvf_connector* c2 = NULL;
  CHECK_OK(NULL, kvf_connector_create(&opts, &c2), "a second connector");
  CHECK_ERR(c2, kvf_connector_save_kv_layer(c2, 1, 0), KVF_CONNECTOR_INVALID_ARGUMENT,
            "the second connector: save before registering");
  CHECK(strstr(kvf_connector_last_error(c), "num_layers") != NULL,
        "the first handle still holds its own last error: \"%s\"", kvf_connector_last_error(c));
  kvf_connector_destroy(c2);

  CHECK(strcmp(kvf_connector_status_name(KVF_CONNECTOR_NOT_FOUND), "not_found") == 0 &&
            strcmp(kvf_connector_status_name(-1), "unknown") == 0 &&
            strcmp(kvf_connector_status_name(1000), "unknown") == 0,
        "status names");

  /* Still serving after all of it: a whole request again. */
  admit(c, 5, prompt, blocks2, 7);
  for (uint32_t l = 0; l < kLayers; ++l)
    CHECK_OK(c, kvf_connector_save_kv_layer(c, 5, l), "save (request 5)");
  CHECK_OK(c, kvf_connector_wait_for_save(c), "wait_for_save (request 5)");
  CHECK_OK(c, kvf_connector_request_finished(c, 5, &free_later), "request_finished (request 5)");

  kvf_connector_destroy(c);
  for (int l = 0; l < kLayers; ++l) free(layers[l]);

  test_pd(prompt);

  if (failures > 0) {
    printf("%d check(s) FAILED\n", failures);
    return 1;
  }
  printf("all checks passed\n");
  return 0;
}
