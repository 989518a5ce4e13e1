/* The router C ABI used from C against running kvfabricd daemons (tests/integration/router_client.sh
 * starts them): hashing, lookup, best engine, pin/unpin, stats, health, move's refusal, clear by an
 * unknown model, a node that
 * is down, buffers too small. Compiled as C11.
 *   c_abi_test TOPOLOGY MODEL TOKENS_CSV EXPECT_NODE EXPECT_TOKENS [DOWN_NODE]
 * Prints the first chunk key (so the script can compare it with kvfabric-ctl keys) and one line per
 * check; exits 0 only when every check passed. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvf/router/kvf_router.h"

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

static size_t parse_tokens(const char* csv, uint32_t* out, size_t cap) {
  size_t n = 0;
  const char* p = csv;
  while (*p != '\0' && n < cap) {
    char* end = NULL;
    unsigned long v = strtoul(p, &end, 10);
    if (end == p) break;
    out[n++] = (uint32_t)v;
    p = (*end == ',') ? end + 1 : end;
  }
  return n;
}

static const kvf_router_node_result* find_result(const kvf_router_node_result* r, size_t n,
                                                 const char* node) {
  for (size_t i = 0; i < n; ++i) {
    if (strcmp(r[i].node, node) == 0) return &r[i];
  }
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s TOPOLOGY MODEL TOKENS_CSV EXPECT_NODE EXPECT_TOKENS [DOWN_NODE]\n", argv[0]);
    return 2;
  }
  const char* topology = argv[1];
  const char* model = argv[2];
  const char* expect_node = argv[4];
  const uint64_t expect_tokens = strtoull(argv[5], NULL, 10);
  const char* down_node = argc > 6 ? argv[6] : NULL;
  static uint32_t tokens[65536];
  const size_t num_tokens = parse_tokens(argv[3], tokens, sizeof tokens / sizeof tokens[0]);

  char error[512] = "";
  kvf_router* bad = kvf_router_create_from_topology("/nonexistent/topology.yaml", 0, error, sizeof error);
  CHECK(bad == NULL && strlen(error) > 0, "a missing topology file fails with a reason: %s", error);

  kvf_router* router = kvf_router_create_from_topology(topology, 2000, error, sizeof error);
  CHECK(router != NULL, "create from %s %s", topology, error);
  if (router == NULL) return 1;

  /* Keys: first ask with too small a buffer, then with enough. */
  kvf_router_key keys[512];
  size_t num_keys = 0;
  int rc = kvf_router_chunk_keys(router, model, tokens, num_tokens, keys, &num_keys);
  CHECK(rc == KVF_ROUTER_BUFFER_TOO_SMALL && num_keys > 0, "chunk_keys into no room: rc %d, needs %zu", rc,
        num_keys);
  num_keys = sizeof keys / sizeof keys[0];
  rc = kvf_router_chunk_keys(router, model, tokens, num_tokens, keys, &num_keys);
  CHECK(rc == KVF_ROUTER_OK && num_keys > 0, "chunk_keys: rc %d, %zu keys", rc, num_keys);
  if (num_keys > 0) printf("first_key=%016" PRIx64 "%016" PRIx64 "\n", keys[0].hi, keys[0].lo);
  rc = kvf_router_chunk_keys(router, "no-such-model", tokens, num_tokens, keys, &num_keys);
  CHECK(rc == KVF_ROUTER_INVALID_ARGUMENT && strstr(kvf_router_last_error(router), "no-such-model") != NULL,
        "unknown model: rc %d, '%s'", rc, kvf_router_last_error(router));
  num_keys = sizeof keys / sizeof keys[0];
  kvf_router_chunk_keys(router, model, tokens, num_tokens, keys, &num_keys);

  /* Lookup: the expected node holds expect_tokens; the down node is reported, not fatal. */
  kvf_router_node_match nodes[16];
  size_t num_nodes = 16;
  uint32_t query_chunks = 0;
  rc = kvf_router_lookup(router, model, tokens, num_tokens, nodes, &num_nodes, &query_chunks);
  CHECK(rc == KVF_ROUTER_OK, "lookup: rc %d (%s)", rc, kvf_router_last_error(router));
  CHECK(query_chunks == num_keys, "lookup: query_chunks %u == %zu keys", query_chunks, num_keys);
  int saw_expected = 0, saw_down = 0;
  uint32_t held_chunks = 0;
  for (size_t i = 0; i < num_nodes; ++i) {
    printf("  node %s reached=%d status=%d matched_tokens=%" PRIu64 " tier=%s\n", nodes[i].node,
           nodes[i].reached, nodes[i].status, nodes[i].matched_tokens, nodes[i].tier);
    if (strcmp(nodes[i].node, expect_node) == 0) {
      held_chunks = nodes[i].matched_chunks;
      saw_expected =
          nodes[i].reached && nodes[i].matched_tokens == expect_tokens && strcmp(nodes[i].tier, "dram") == 0;
    }
    if (down_node != NULL && strcmp(nodes[i].node, down_node) == 0) {
      saw_down = !nodes[i].reached && nodes[i].status == KVF_ROUTER_PEER_LOST;
    }
  }
  CHECK(saw_expected, "lookup: node %s holds %" PRIu64 " tokens in dram", expect_node, expect_tokens);
  if (down_node != NULL) {
    CHECK(saw_down && strstr(kvf_router_last_error(router), down_node) != NULL,
          "lookup: node %s reported down: '%s'", down_node, kvf_router_last_error(router));
  }
  size_t too_few = 0;
  rc = kvf_router_lookup(router, model, tokens, num_tokens, nodes, &too_few, NULL);
  CHECK(rc == KVF_ROUTER_BUFFER_TOO_SMALL && too_few == num_nodes, "lookup into no room: rc %d, needs %zu",
        rc, too_few);

  kvf_router_engine best;
  rc = kvf_router_best_engine(router, model, tokens, num_tokens, &best);
  CHECK(rc == KVF_ROUTER_OK && strcmp(best.node, expect_node) == 0 && best.cached == 1 &&
            best.matched_tokens == expect_tokens,
        "best_engine: rc %d engine '%s' on node '%s' role %s, %" PRIu64 " tokens, cached %d", rc, best.engine,
        best.node, best.role, best.matched_tokens, best.cached);

  /* Pin, stats, unpin on the expected node. */
  kvf_router_node_result results[16];
  size_t num_results = 16;
  rc = kvf_router_pin(router, keys, num_keys, expect_node, results, &num_results);
  CHECK(rc == KVF_ROUTER_OK && num_results == 1 && results[0].status == 0 && held_chunks > 0 &&
            results[0].changed == held_chunks && results[0].not_found == num_keys - held_chunks,
        "pin: rc %d, node %s pinned %" PRIu64 ", not found %" PRIu64, rc, results[0].node, results[0].changed,
        results[0].not_found);
  const uint64_t pinned = results[0].changed;
  num_results = 16;
  rc = kvf_router_stats(router, expect_node, results, &num_results);
  CHECK(rc == KVF_ROUTER_OK && num_results == 1 && results[0].pinned_entries == pinned && pinned > 0,
        "stats: node %s entries %" PRIu64 " pinned %" PRIu64 " used %" PRIu64 "/%" PRIu64, results[0].node,
        results[0].entries, results[0].pinned_entries, results[0].used_bytes, results[0].capacity_bytes);
  num_results = 16;
  rc = kvf_router_unpin(router, keys, num_keys, expect_node, results, &num_results);
  CHECK(rc == KVF_ROUTER_OK && results[0].changed == pinned, "unpin: %" PRIu64 " unpinned",
        results[0].changed);

  num_results = 16;
  rc = kvf_router_health(router, NULL, results, &num_results);
  const kvf_router_node_result* h = find_result(results, num_results, expect_node);
  CHECK(rc == KVF_ROUTER_OK && h != NULL && h->healthy == 1 && h->reached == 1, "health: node %s ok",
        expect_node);
  if (down_node != NULL) {
    const kvf_router_node_result* d = find_result(results, num_results, down_node);
    CHECK(d != NULL && d->reached == 0 && d->healthy == 0, "health: node %s down", down_node);
  }

  /* Move to a node the topology lacks: the daemon's refusal comes back with its text and the node. */
  uint64_t moved = 0;
  rc = kvf_router_move(router, expect_node, "no-such-node", keys, num_keys, 1, &moved);
  CHECK(rc == KVF_ROUTER_INVALID_ARGUMENT && strstr(kvf_router_last_error(router), "no-such-node") != NULL &&
            strstr(kvf_router_last_error(router), "HTTP 400") != NULL,
        "move to an unknown node: rc %d, '%s'", rc, kvf_router_last_error(router));

  /* Clear by a model the daemons do not know: each node answers 400, nothing is cleared. */
  num_results = 16;
  rc = kvf_router_clear_model(router, "no-such-model", expect_node, results, &num_results);
  CHECK(rc == KVF_ROUTER_OK && num_results == 1 && results[0].status == KVF_ROUTER_INVALID_ARGUMENT &&
            strstr(kvf_router_last_error(router), "unknown model 'no-such-model'") != NULL,
        "clear_model of an unknown model: rc %d, node status %d, '%s'", rc, results[0].status,
        kvf_router_last_error(router));
  rc = kvf_router_clear_model(router, NULL, expect_node, results, &num_results);
  CHECK(rc == KVF_ROUTER_INVALID_ARGUMENT, "clear_model of NULL: rc %d", rc);
  num_results = 16;
  rc = kvf_router_stats(router, expect_node, results, &num_results);
  CHECK(rc == KVF_ROUTER_OK && results[0].entries >= held_chunks && held_chunks > 0,
        "after the refused clears node %s still holds %" PRIu64 " entries", expect_node, results[0].entries);

  rc = kvf_router_pin(router, keys, num_keys, "no-such-node", results, &num_results);
  CHECK(rc == KVF_ROUTER_NOT_FOUND, "pin on an unknown node: rc %d, '%s'", rc, kvf_router_last_error(router));
  kvf_router_destroy(router);

  /* Explicit endpoints, one of them with nothing listening: port 1 on loopback. */
  const char* names[1] = {"nowhere"};
  const char* hosts[1] = {"127.0.0.1"};
  const uint16_t ports[1] = {1};
  kvf_router* direct = kvf_router_create_from_endpoints(names, hosts, ports, 1, 500);
  CHECK(direct != NULL, "create from endpoints");
  if (direct != NULL) {
    num_nodes = 16;
    rc = kvf_router_lookup(direct, model, tokens, num_tokens, nodes, &num_nodes, NULL);
    CHECK(rc == KVF_ROUTER_OK && num_nodes == 1 && nodes[0].reached == 0 &&
              nodes[0].status == KVF_ROUTER_PEER_LOST,
          "endpoint with nothing listening is reported down: '%s'", kvf_router_last_error(direct));
    kvf_router_destroy(direct);
  }

  if (failures > 0) {
    printf("c_abi_test: %d check(s) FAILED\n", failures);
    return 1;
  }
  printf("c_abi_test: all checks passed\n");
  return 0;
}
