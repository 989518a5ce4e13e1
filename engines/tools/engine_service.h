// EngineService: a reference engine as a long-running process (kvfabric-engine --topology FILE
// --engine NAME) serving requests over HTTP/JSON on the engine's port from the topology, the way a
// request router or a PD proxy (examples/pd_demo) drives real engines:
//   GET  /health    the engine's name, role, model shape, device and (decode) KV port
//   POST /generate  {"prompt": [ids] | "prompt_tokens": N, "prompt_seed": S, "n_new": M}: prefill and
//                   decode in this one engine -> {"tokens", "ttft_ms", "total_ms"}
//   POST /prefill   (prefill/both) the same prompt fields plus "request_id" and "decode": "HOST:PORT"
//                   (a decode engine's KV port) and "stream" (default true: each layer's KV goes as soon
//                   as it is written; false: after the prefill) -> {"first_token", "prefill_ms",
//                   "kv_landed_ms"} once the decode engine holds every layer
//   POST /decode    (decode/both) {"request_id", "first_token", "n_new", "timeout_ms"}: waits for that
//                   request's KV, then decodes from the first token the prefill gave (so the tokens are
//                   exactly one engine's) -> {"tokens" (first included), "kv_wait_ms", "decode_ms"}
// KV moves through the engine connector (KvConnector): host memory over UCX on the CPU, GPU memory
// over cuda_ipc between GPUs of one host. Bad requests get 4xx with {"error": "..."}; the engine
// keeps serving. Thread rules: one HTTP connection per thread; the model runs one request at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "kvf/engines/model_shape.h"

namespace kvf::engines {

struct EngineServiceOptions {
  std::string name;
  std::string role;  // prefill | decode | both
  std::string model_name;
  ModelShape shape;
  uint64_t seed = 1;
  int device = -1;   // -1: the CPU
  std::string host;  // the HTTP API: host and port
  uint16_t port = 0;
  uint32_t pool_blocks = 1024;
};

// Serves until `stop` turns true (checked every 100 ms). Returns the process exit code: 0 after a
// clean stop, 1 when the engine could not start (the reason printed).
int run_engine_service(const EngineServiceOptions& options, const std::atomic<bool>& stop);

}  // namespace kvf::engines
