/* The engine connector's C ABI (kvf/engines/kv_connector_c.h) used from C, without a store: create,
 * register host caches, a lookup that matches nothing, the step flow (update, save every layer,
 * finish), the misuse errors (each with its code and a message, the handle serving on after each),
 * NULL and bad arguments, and get_finished's arrays that are too small losing nothing.
 * Compiled as C11 (so the header is proven to be C); exits 0 only when every check passed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  if (failures > 0) {
    printf("%d check(s) FAILED\n", failures);
    return 1;
  }
  printf("all checks passed\n");
  return 0;
}
