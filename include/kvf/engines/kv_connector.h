// KvConnector: the engine-facing connector, shaped like the calls inference engines already make
// (vLLM v1's KV connector): the engine registers its paged KV caches once; its scheduler asks how
// many prompt tokens can be loaded instead of computed and says which blocks a request got; its
// worker starts the step's loads, waits for a layer's load before computing that layer, saves
// each layer once written, and waits for the saves at the end of the step; a finished request's
// blocks are freed at once or, while the connector still reads them, once get_finished() lists
// it. Blocks whose load failed are reported, so the engine recomputes them instead of using them.
//
// What moves:
// - Prefixes through the node's store (kvfabricd, via StoreConnector): loads are whole stored
//   chunks, checked against their checksums before any byte reaches the engine's blocks; a
//   request's full chunks are stored once every layer of it has been saved. Without a store every
//   lookup matches nothing.
// - PD (host caches over UCX; GPU caches over cuda_ipc, GPU to GPU on one host, the caches'
//   memory exported for CUDA IPC): a prefill engine names the decode engine of a request
//   (send_kv_to); each layer goes to it as soon as save_kv_layer reports it, while later layers
//   are computed. A decode engine listens (options.listen): arriving requests land straight in
//   its blocks (from its allocate_blocks) and get_finished() lists them under `receiving` once
//   every layer is in; take_received() hands over their blocks and the sender's context. PD needs
//   the layer buffers back to back in one allocation (layer l at layers[0] + l * layer_bytes).
//
// Errors: misuse (an unknown request: kNotFound; a call on an aborted request: kAborted; a layer
// out of range, a layer saved twice, registering twice or calling before registering:
// kInvalidArgument) returns a clear error and
// changes nothing; the connector keeps serving every other request. Load and store failures
// (a checksum mismatch, the daemon gone) are values: failed loads show up in
// get_block_ids_with_load_errors(), failed saves in wait_for_save()'s status.
//
// Threads: every method may be called from any thread (one mutex); loads and stores run on the
// connector's own worker thread, one at a time. wait_* block the caller only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvf/engines/kv_cache_view.h"
#include "kvf/engines/store_connector.h"
#include "kvf/protocol/status.h"
#include "kvf/store/store_client.h"

namespace kvf::engines {

using RequestId = uint64_t;

struct KvConnectorOptions {
  std::string model;  // the model's name (part of every chunk key)
  uint32_t chunk_tokens = protocol::kDefaultChunkTokens;
  // The node's prefix store; null: no reuse. Must outlive the connector.
  store::StoreClient* store = nullptr;
  LayerMemory memory = LayerMemory::kAuto;
  bool verify_loads = true;
  // PD, decode side: "host:port" to take prefill engines' streams on (port 0: any); empty: none.
  std::string listen;
  // PD, decode side: the engine's block manager. Blocks for an arriving request of `n` blocks
  // (distinct, in range; empty: refuse it), and the blocks of a stream that failed, handed back.
  // Called on the connector's threads.
  std::function<std::vector<uint32_t>(RequestId, uint32_t n)> allocate_blocks;
  std::function<void(RequestId, std::vector<uint32_t> blocks)> release_blocks;
  std::string name = "kvfabric-engine";  // shown to peers
};

// PD, decode side: a request whose KV arrived.
struct ReceivedKv {
  RequestId request = 0;
  std::vector<uint32_t> blocks;          // the request's blocks in order; the engine's to use and free
  std::vector<uint8_t> context;          // what the prefill engine sent with it
  std::vector<double> layer_arrival_ms;  // per layer, since the stream was accepted
};

// Requests whose connector work ended since the last get_finished().
struct FinishedRequests {
  std::vector<RequestId> sending;    // finished requests whose saves are done: free their blocks now
  std::vector<RequestId> receiving;  // loads that ended (done or failed; see load errors), and PD
                                     // requests whose KV arrived (take_received)
};

// What the connector knows of one request, for tools and tests.
struct RequestProgress {
  uint64_t matched_tokens = 0;  // the last lookup's answer
  uint64_t loaded_tokens = 0;   // tokens whose KV the load placed (0 until it ends)
  uint32_t layers_saved = 0;
  uint32_t chunks_stored = 0;  // by this connector (chunks the store already had not counted)
  bool load_failed = false;
  bool aborted = false;
};

class KvConnector {
 public:
  static Result<std::unique_ptr<KvConnector>> create(KvConnectorOptions options);
  ~KvConnector();  // waits for the worker's current job; queued jobs are dropped
  KvConnector(const KvConnector&) = delete;
  KvConnector& operator=(const KvConnector&) = delete;

  // --- worker, once ----------------------------------------------------------------------------
  // The engine's paged KV caches: layout and one buffer per layer (host or one GPU's memory). They
  // must outlive the connector. kInvalidArgument when called twice or for a view StoreConnector
  // refuses (the message says why).
  Status register_kv_caches(const KvCacheView& caches);

  // --- scheduler ---------------------------------------------------------------------------------
  // How many tokens of `prompt` beyond `num_computed_tokens` the store can provide (whole chunks;
  // never the whole prompt: the last token is always computed, so the engine gets logits). Makes
  // the request known; may be called again for it until update_state_after_alloc.
  Result<uint64_t> get_num_new_matched_tokens(RequestId request, std::span<const uint32_t> prompt,
                                              uint64_t num_computed_tokens);
  // The blocks the engine gave the request (block_table[i] holds tokens [i*block_tokens, ...)) and
  // how many of the matched tokens it wants loaded (0: none; at most the match). The load starts at
  // the next start_load_kv().
  Status update_state_after_alloc(RequestId request, std::span<const uint32_t> block_table,
                                  uint64_t num_external_tokens);
  // The request is done. true: the connector still reads its blocks (a save is queued or running):
  // free them once get_finished() lists the request under `sending`; false: free them now. The
  // request is forgotten once nothing of it is pending.
  Result<bool> request_finished(RequestId request);
  // Ends a request early (the engine preempted or cancelled it): queued work for it is dropped;
  // later calls naming it give kAborted; it is forgotten at request_finished.
  Status abort(RequestId request);

  // --- worker, per step ------------------------------------------------------------------------------
  // Starts every load set up since the last call, on the connector's thread.
  Status start_load_kv();
  // Blocks until layer `layer` of every started load is in place, or its load failed.
  // kInvalidArgument for a layer the caches do not have.
  Status wait_for_layer_load(uint32_t layer);
  // Blocks until the request's load has ended: Ok when its bytes are in place, the load's error
  // otherwise; kAborted for an aborted request; Ok at once when it has nothing to load.
  Status wait_for_load(RequestId request);
  // Layer `layer` of the request's KV is written. Once every layer is, its full chunks are queued
  // for the store. kInvalidArgument for a layer saved twice, a layer the caches do not have, or a
  // request without blocks yet (update_state_after_alloc); kNotFound for an unknown request,
  // kAborted for an aborted one (as for every call naming a request).
  Status save_kv_layer(RequestId request, uint32_t layer);
  // The same for GPU caches written asynchronously: `cuda_stream` (a cudaStream_t of the caches'
  // GPU) holds the layer's K/V writes; the connector records an event on it, and a PD stream or a
  // store reads the layer only once that event has passed (the engine's stream never waits).
  // kInvalidArgument when the caches are host memory.
  Status save_kv_layer(RequestId request, uint32_t layer, void* cuda_stream);
  // Blocks until every queued store has ended; the first failure since the last call, or Ok.
  Status wait_for_save();

  // --- PD ------------------------------------------------------------------------------------
  // Prefill side (scheduler): the request's KV goes to the decode engine at `peer` ("host:port")
  // with `context`, layer by layer as save_kv_layer reports each layer: every block of the
  // request's table is sent (so a table covering the tokens decode will append lets the decode
  // engine write them in place). Call after update_state_after_alloc and before saving layers. The
  // stream runs on a thread of its own; request_finished answers true until it has ended, and
  // wait_for_send gives its outcome. kUnavailable when the caches are not one allocation (see
  // above), or GPU caches where CUDA IPC cannot run. Aborting the request (or destroying the connector) ends
  // its stream before the first layer not yet saved, and the decode engine is told (it never takes it as
  // complete).
  Status send_kv_to(RequestId request, const std::string& peer, std::vector<uint8_t> context);
  // Blocks until the request's stream has ended: Ok once the decode engine has every layer.
  Status wait_for_send(RequestId request);
  // Decode side: the port taken (0 when not listening).
  uint16_t listen_port() const;
  // Decode side: a request get_finished() listed under `receiving` (once; kNotFound otherwise).
  Result<ReceivedKv> take_received(RequestId request);

  FinishedRequests get_finished();
  // Blocks of loads that failed since the last call: the engine recomputes them.
  std::vector<uint32_t> get_block_ids_with_load_errors();

  Result<RequestProgress> progress(RequestId request) const;
  uint32_t num_layers() const;  // 0 before register_kv_caches

 private:
  struct Impl;
  explicit KvConnector(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::engines
