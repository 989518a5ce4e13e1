// GpuReferenceModel: setup (weights, workspace, cuBLAS), input validation and the forward pass,
// which enqueues the kernels of gpu_model_kernels.cu and cuBLAS GEMMs on the model's stream.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "cuda/gpu_model_kernels.cuh"
#include "cuda/gpu_weight_init.cuh"
#include "kvf/engines/gpu_reference_model.h"
#include "kvf/engines/reference_kernels.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "request_checks.h"

namespace kvf::engines {
namespace {

using gpu::bf16;

// Hopper's cuBLAS wants 32 MiB of workspace; an explicit one stays bound to the model's stream.
constexpr uint64_t kCublasWorkspaceBytes = uint64_t{32} << 20;
// Score rows are padded to a multiple of this many keys, so every row of the bf16 probabilities
// starts 16-byte aligned (what cuBLAS's tensor-core kernels want).
constexpr uint32_t kScoreRowAlign = 8;
constexpr uint64_t kAlign = 256;  // of every sub-allocation (cudaMalloc's own alignment)

Status invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

// "cudaErrorMemoryAllocation (out of memory)"; also clears the thread's last-error slot, so a
// reported failure does not resurface from an unrelated later call.
std::string cuda_text(cudaError_t err) {
  cudaGetLastError();
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

Status cuda_failure(const char* call, cudaError_t err) {
  return Status(err == cudaErrorMemoryAllocation ? ErrorCode::kOutOfMemory : ErrorCode::kInternal,
                std::string("GpuReferenceModel: ") + call + " failed: " + cuda_text(err));
}

Status cublas_failure(const char* call, cublasStatus_t status) {
  return Status(status == CUBLAS_STATUS_ALLOC_FAILED ? ErrorCode::kOutOfMemory : ErrorCode::kInternal,
                std::string("GpuReferenceModel: ") + call + " failed: " + cublasGetStatusName(status) + " (" +
                    cublasGetStatusString(status) + ")");
}

#define KVF_GPU_MODEL_CUDA(call)                                                                         \
  do {                                                                                                   \
    if (const cudaError_t kvf_err = (call); kvf_err != cudaSuccess) return cuda_failure(#call, kvf_err); \
  } while (0)

#define KVF_GPU_MODEL_CUBLAS(call)                                                     \
  do {                                                                                 \
    if (const cublasStatus_t kvf_status = (call); kvf_status != CUBLAS_STATUS_SUCCESS) \
      return cublas_failure(#call, kvf_status);                                        \
  } while (0)

#define KVF_GPU_MODEL_OK(expr)                            \
  do {                                                    \
    if (Status kvf_s = (expr); !kvf_s.ok()) return kvf_s; \
  } while (0)

// Calls come from threads whose CUDA device the engine chose; each sets the model's and restores theirs.
using DeviceGuard = gpudirect::ScopedDevice;

uint64_t blocks_for(uint64_t tokens, uint32_t block_tokens) {
  return (tokens + block_tokens - 1) / block_tokens;
}

uint64_t round_up(uint64_t value, uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Offsets of sub-allocations inside one device allocation, each kAlign-aligned.
class Carve {
 public:
  template <typename T>
  uint64_t add(uint64_t count) {
    const uint64_t offset = round_up(total_, kAlign);
    total_ = offset + count * sizeof(T);
    return offset;
  }
  uint64_t total() const { return round_up(total_, kAlign); }

 private:
  uint64_t total_ = 0;
};

template <typename T>
T* at(const gpudirect::DeviceBuffer& buffer, uint64_t offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(buffer.data()) + offset);
}

// Where a kFlashAttention layer buffer holds each token's K and V, from the layout's own extents.
gpu::KvAddressing addressing_of(const protocol::KvLayout& layout) {
  const protocol::KvLayoutDesc& d = layout.desc();
  gpu::KvAddressing a;
  a.key_base = layout.extent(0, protocol::KvPart::kKey).offset;
  a.value_base = layout.extent(0, protocol::KvPart::kValue).offset;
  a.block_stride =
      d.num_blocks > 1 ? layout.extent(1, protocol::KvPart::kKey).offset - a.key_base : layout.part_bytes();
  a.block_tokens = d.block_tokens;
  a.token_bytes = d.kv_heads * d.head_dim * d.dtype_bytes;
  return a;
}

// C[rows][out] (row-major) = A[rows][in] (bf16, row-major) * W[in][out] (bf16, input-major) + beta * C.
// cuBLAS is column-major: there the same bytes are C^T = W^T A^T, with no transposes.
Status gemm(cublasHandle_t handle, const bf16* a, const bf16* w, void* c, cudaDataType c_type, uint32_t rows,
            uint32_t in, uint32_t out, float beta) {
  const float alpha = 1.0f;
  const int m = static_cast<int>(out);
  const int n = static_cast<int>(rows);
  const int k = static_cast<int>(in);
  KVF_GPU_MODEL_CUBLAS(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_16BF, m, a,
                                    CUDA_R_16BF, k, &beta, c, c_type, m, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
  return Status::Ok();
}

struct LayerWeights {
  bf16* wqkv = nullptr;       // [hidden][q | k | v]
  bf16* wo = nullptr;         // [q_heads * head_dim][hidden]
  bf16* w_gate_up = nullptr;  // [hidden][gate | up]
  bf16* w_down = nullptr;     // [intermediate][hidden]
  float* attn_norm = nullptr;
  float* mlp_norm = nullptr;
};

}  // namespace

struct GpuReferenceModel::Impl {
  int device = 0;
  gpu::Dims dims;
  uint32_t vocab = 0;
  gpudirect::CudaStream stream;
  cublasHandle_t cublas = nullptr;
  gpudirect::DeviceBuffer weights;                 // bf16 matrices
  gpudirect::DeviceBuffer norms;                   // fp32 norm weights
  gpudirect::DeviceBuffer workspace;               // everything a call computes
  std::optional<gpudirect::PinnedBuffer> staging;  // the host side of a call's inputs and its token

  bf16* embedding = nullptr;  // [vocab][hidden]
  std::vector<LayerWeights> layers;
  float* final_norm = nullptr;
  bf16* lm_head = nullptr;  // [hidden][vocab]

  // Views of the workspace (N = max_batch_tokens rows, T = max_context positions).
  uint32_t* tokens = nullptr;  // [N]
  uint32_t* table = nullptr;   // [blocks of T]
  uint32_t* next_token = nullptr;
  float* x = nullptr;             // [N][hidden] the residual stream
  bf16* xn = nullptr;             // [N][hidden] normalized
  float* proj = nullptr;          // [N][max(qkv width, 2 * intermediate)]
  bf16* q_grouped = nullptr;      // [N * q_heads * head_dim], grouped layout
  bf16* o_grouped = nullptr;      // the same for the attention's output
  bf16* attn = nullptr;           // [N][q_heads * head_dim]
  bf16* act = nullptr;            // [N][intermediate]
  bf16* keys = nullptr;           // [T][kv_heads * head_dim]
  bf16* values = nullptr;         // [T][kv_heads * head_dim]
  float* scores = nullptr;        // [score_capacity]
  bf16* probs = nullptr;          // [score_capacity]
  float* vocab_logits = nullptr;  // [vocab]
  float2* rope = nullptr;         // [T][head_dim / 2] (cos, sin)
  uint64_t score_capacity = 0;
  // Views of the staging.
  uint32_t* host_tokens = nullptr;
  uint32_t* host_table = nullptr;
  uint32_t* host_next_token = nullptr;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    if (cublas != nullptr) {
      DeviceGuard guard(device);
      cublasDestroy(cublas);
    }
  }

  cudaStream_t s() const { return static_cast<cudaStream_t>(stream.handle()); }

  // Everything but the weights' values: buffers, cuBLAS, the RoPE table. The device is current.
  static Result<std::unique_ptr<Impl>> allocate(const ModelShape& shape, const GpuModelOptions& options);
  // The forward pass over the staged inputs, enqueued on the stream (not synchronized).
  // `logits`, when given, receives the last position's logits once the stream has run.
  Status enqueue_forward(uint32_t rows, uint32_t first_position, const KvCacheView& kv,
                         const GpuLayerSavedFn& on_layer_saved, std::vector<float>* logits);
  Status attention(uint32_t rows, uint32_t first_position);
};

Result<std::unique_ptr<GpuReferenceModel::Impl>> GpuReferenceModel::Impl::allocate(const ModelShape& shape,
                                                                                   const GpuModelOptions& o) {
  const gpu::Dims d{shape.hidden, shape.q_heads, shape.kv_heads, shape.head_dim, shape.intermediate};
  const uint64_t n = o.max_batch_tokens;
  const uint64_t t = o.max_context;
  auto m = std::make_unique<Impl>();
  m->device = o.device;
  m->dims = d;
  m->vocab = shape.vocab;

  // Weights: matrices bf16, norms fp32 (hidden values per norm: nothing to save by rounding them).
  Carve w;
  const uint64_t h = d.hidden;
  const uint64_t emb_at = w.add<bf16>(uint64_t{shape.vocab} * h);
  struct LayerOffsets {
    uint64_t wqkv, wo, w_gate_up, w_down;
  };
  std::vector<LayerOffsets> layer_at(shape.layers);
  for (LayerOffsets& l : layer_at) {
    l.wqkv = w.add<bf16>(h * d.qkv_width());
    l.wo = w.add<bf16>(uint64_t{d.q_width()} * h);
    l.w_gate_up = w.add<bf16>(h * 2 * d.intermediate);
    l.w_down = w.add<bf16>(uint64_t{d.intermediate} * h);
  }
  const uint64_t lm_at = w.add<bf16>(h * shape.vocab);
  Carve nw;
  std::vector<std::pair<uint64_t, uint64_t>> norm_at(shape.layers);
  for (auto& [attn_norm, mlp_norm] : norm_at) {
    attn_norm = nw.add<float>(h);
    mlp_norm = nw.add<float>(h);
  }
  const uint64_t final_norm_at = nw.add<float>(h);

  // Scores: at least one row at full context; as many rows as the budget holds, up to N. With the
  // default 4 GiB an 8B-shaped prefill of 16k tokens runs in a few tiles.
  const uint64_t row_elems = uint64_t{d.q_heads} * round_up(t, kScoreRowAlign);
  m->score_capacity = std::max(row_elems, std::min(o.attention_score_bytes / sizeof(float), row_elems * n));

  Carve ws;
  const uint64_t tokens_at = ws.add<uint32_t>(n);
  const uint64_t table_at = ws.add<uint32_t>(blocks_for(t, shape.block_tokens));
  const uint64_t next_at = ws.add<uint32_t>(1);
  const uint64_t x_at = ws.add<float>(n * h);
  const uint64_t xn_at = ws.add<bf16>(n * h);
  const uint64_t proj_at = ws.add<float>(n * std::max<uint64_t>(d.qkv_width(), 2 * uint64_t{d.intermediate}));
  const uint64_t qg_at = ws.add<bf16>(n * d.q_width());
  const uint64_t og_at = ws.add<bf16>(n * d.q_width());
  const uint64_t attn_at = ws.add<bf16>(n * d.q_width());
  const uint64_t act_at = ws.add<bf16>(n * d.intermediate);
  const uint64_t keys_at = ws.add<bf16>(t * d.kv_width());
  const uint64_t values_at = ws.add<bf16>(t * d.kv_width());
  const uint64_t scores_at = ws.add<float>(m->score_capacity);
  const uint64_t probs_at = ws.add<bf16>(m->score_capacity);
  const uint64_t logits_at = ws.add<float>(shape.vocab);
  const uint64_t rope_at = ws.add<float2>(t * (d.head_dim / 2));
  const uint64_t freq_at = ws.add<double>(d.head_dim / 2);
  const uint64_t cublas_at = ws.add<uint8_t>(kCublasWorkspaceBytes);

  Carve st;
  const uint64_t host_tokens_at = st.add<uint32_t>(n);
  const uint64_t host_table_at = st.add<uint32_t>(blocks_for(t, shape.block_tokens));
  const uint64_t host_next_at = st.add<uint32_t>(1);

  auto new_stream = gpudirect::CudaStream::create(o.device);
  if (!new_stream.ok()) return new_stream.status();
  m->stream = std::move(new_stream.value());
  auto weight_memory = gpudirect::DeviceBuffer::allocate(o.device, w.total());
  if (!weight_memory.ok()) return weight_memory.status();
  m->weights = std::move(weight_memory.value());
  auto norm_memory = gpudirect::DeviceBuffer::allocate(o.device, nw.total());
  if (!norm_memory.ok()) return norm_memory.status();
  m->norms = std::move(norm_memory.value());
  auto workspace_memory = gpudirect::DeviceBuffer::allocate(o.device, ws.total());
  if (!workspace_memory.ok()) return workspace_memory.status();
  m->workspace = std::move(workspace_memory.value());
  auto staging_memory = gpudirect::PinnedBuffer::allocate(st.total());
  if (!staging_memory.ok()) return staging_memory.status();
  m->staging.emplace(std::move(staging_memory.value()));

  m->embedding = at<bf16>(m->weights, emb_at);
  m->layers.resize(shape.layers);
  for (uint32_t l = 0; l < shape.layers; ++l) {
    LayerWeights& lw = m->layers[l];
    lw.wqkv = at<bf16>(m->weights, layer_at[l].wqkv);
    lw.wo = at<bf16>(m->weights, layer_at[l].wo);
    lw.w_gate_up = at<bf16>(m->weights, layer_at[l].w_gate_up);
    lw.w_down = at<bf16>(m->weights, layer_at[l].w_down);
    lw.attn_norm = at<float>(m->norms, norm_at[l].first);
    lw.mlp_norm = at<float>(m->norms, norm_at[l].second);
  }
  m->final_norm = at<float>(m->norms, final_norm_at);
  m->lm_head = at<bf16>(m->weights, lm_at);

  const gpudirect::DeviceBuffer& b = m->workspace;
  m->tokens = at<uint32_t>(b, tokens_at);
  m->table = at<uint32_t>(b, table_at);
  m->next_token = at<uint32_t>(b, next_at);
  m->x = at<float>(b, x_at);
  m->xn = at<bf16>(b, xn_at);
  m->proj = at<float>(b, proj_at);
  m->q_grouped = at<bf16>(b, qg_at);
  m->o_grouped = at<bf16>(b, og_at);
  m->attn = at<bf16>(b, attn_at);
  m->act = at<bf16>(b, act_at);
  m->keys = at<bf16>(b, keys_at);
  m->values = at<bf16>(b, values_at);
  m->scores = at<float>(b, scores_at);
  m->probs = at<bf16>(b, probs_at);
  m->vocab_logits = at<float>(b, logits_at);
  m->rope = at<float2>(b, rope_at);
  auto* host = static_cast<uint8_t*>(m->staging->data());
  m->host_tokens = reinterpret_cast<uint32_t*>(host + host_tokens_at);
  m->host_table = reinterpret_cast<uint32_t*>(host + host_table_at);
  m->host_next_token = reinterpret_cast<uint32_t*>(host + host_next_at);

  KVF_GPU_MODEL_CUBLAS(cublasCreate(&m->cublas));
  // cublasSetStream drops a user workspace, so the workspace is set after it.
  KVF_GPU_MODEL_CUBLAS(cublasSetStream(m->cublas, m->s()));
  KVF_GPU_MODEL_CUBLAS(cublasSetWorkspace(m->cublas, at<uint8_t>(b, cublas_at), kCublasWorkspaceBytes));
  // Split-K partial sums in fp32 even where the output is bf16 (the attention's P V).
  KVF_GPU_MODEL_CUBLAS(cublasSetMathMode(m->cublas, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));

  // RoPE frequencies exactly as the CPU engine computes them; the angles' cos and sin on the GPU.
  const uint32_t half = d.head_dim / 2;
  std::vector<double> frequencies(half);
  for (uint32_t i = 0; i < half; ++i) {
    frequencies[i] = std::pow(kRopeTheta, -2.0 * static_cast<double>(i) / static_cast<double>(d.head_dim));
  }
  auto* freq = at<double>(b, freq_at);
  KVF_GPU_MODEL_CUDA(
      cudaMemcpyAsync(freq, frequencies.data(), half * sizeof(double), cudaMemcpyHostToDevice, m->s()));
  gpu::fill_rope_table(freq, o.max_context, half, m->rope, m->s());
  KVF_GPU_MODEL_CUDA(cudaGetLastError());
  // `frequencies` is pageable: the copy has read it when this returns.
  KVF_GPU_MODEL_CUDA(cudaStreamSynchronize(m->s()));
  return Result<std::unique_ptr<Impl>>(std::move(m));
}

// --- creation ----------------------------------------------------------------------------------------

namespace {

Status check_options(const ModelShape& shape, const GpuModelOptions& o) {
  if (Status s = shape.validate(); !s.ok()) return s;
  if (o.max_batch_tokens == 0) return invalid("GpuModelOptions: max_batch_tokens is 0");
  if (o.max_context == 0) return invalid("GpuModelOptions: max_context is 0");
  // cuBLAS takes int dimensions: rows * group query rows, and max_context keys.
  if (uint64_t{o.max_batch_tokens} * shape.q_heads > INT32_MAX || o.max_context > (uint32_t{1} << 30)) {
    return invalid("GpuModelOptions: max_batch_tokens " + std::to_string(o.max_batch_tokens) +
                   " or max_context " + std::to_string(o.max_context) + " is too large for this shape");
  }
  const gpudirect::CudaAvailability& cuda = gpudirect::cuda_availability();
  if (cuda.device_count == 0) {
    return Status(ErrorCode::kUnavailable, "GpuReferenceModel: no CUDA device: " + cuda.reason);
  }
  if (o.device < 0 || o.device >= cuda.device_count) {
    return invalid("GpuReferenceModel: CUDA device " + std::to_string(o.device) + " does not exist (" +
                   std::to_string(cuda.device_count) + " visible)");
  }
  return Status::Ok();
}

float matrix_scale(uint64_t fan_in) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(fan_in)));
}

// Uploads a [rows][cols] fp32 host matrix as bf16 into dst, rows `ld` elements apart, on `stream`.
// From pageable memory the copy has read its source when it returns (the DMA may still run), so
// the bf16 staging may go; the stream orders the DMA before the model's kernels.
Status upload_matrix(bf16* dst, const std::vector<float>& src, uint64_t rows, uint64_t cols, uint64_t ld,
                     cudaStream_t stream) {
  std::vector<uint16_t> bits(src.size());
  for (size_t i = 0; i < src.size(); ++i) bits[i] = reference::to_bf16(src[i]);
  KVF_GPU_MODEL_CUDA(cudaMemcpy2DAsync(dst, ld * sizeof(bf16), bits.data(), cols * sizeof(bf16),
                                       cols * sizeof(bf16), rows, cudaMemcpyHostToDevice, stream));
  return Status::Ok();
}

Status upload_norm(float* dst, const std::vector<float>& src, cudaStream_t stream) {
  KVF_GPU_MODEL_CUDA(
      cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  return Status::Ok();
}

Status check_weights(const ModelShape& s, const ReferenceWeights& w) {
  const uint64_t h = s.hidden, qd = uint64_t{s.q_heads} * s.head_dim, kvd = uint64_t{s.kv_heads} * s.head_dim;
  auto wrong = [](const char* name, uint64_t have, uint64_t want) {
    return invalid("weights: " + std::string(name) + " has " + std::to_string(have) +
                   " values, the shape needs " + std::to_string(want));
  };
  if (w.embedding.size() != s.vocab * h) return wrong("embedding", w.embedding.size(), s.vocab * h);
  if (w.layers.size() != s.layers) return wrong("layers", w.layers.size(), s.layers);
  for (const ReferenceLayerWeights& l : w.layers) {
    if (l.attn_norm.size() != h) return wrong("attn_norm", l.attn_norm.size(), h);
    if (l.wq.size() != h * qd) return wrong("wq", l.wq.size(), h * qd);
    if (l.wk.size() != h * kvd) return wrong("wk", l.wk.size(), h * kvd);
    if (l.wv.size() != h * kvd) return wrong("wv", l.wv.size(), h * kvd);
    if (l.wo.size() != qd * h) return wrong("wo", l.wo.size(), qd * h);
    if (l.mlp_norm.size() != h) return wrong("mlp_norm", l.mlp_norm.size(), h);
    if (l.w_gate.size() != h * s.intermediate) return wrong("w_gate", l.w_gate.size(), h * s.intermediate);
    if (l.w_up.size() != h * s.intermediate) return wrong("w_up", l.w_up.size(), h * s.intermediate);
    if (l.w_down.size() != s.intermediate * h) return wrong("w_down", l.w_down.size(), s.intermediate * h);
  }
  if (w.final_norm.size() != h) return wrong("final_norm", w.final_norm.size(), h);
  if (w.lm_head.size() != h * s.vocab) return wrong("lm_head", w.lm_head.size(), h * s.vocab);
  return Status::Ok();
}

}  // namespace

GpuReferenceModel::GpuReferenceModel(const ModelShape& shape, const GpuModelOptions& options)
    : shape_(shape), options_(options) {}

GpuReferenceModel::~GpuReferenceModel() = default;

Result<std::unique_ptr<GpuReferenceModel>> GpuReferenceModel::create(const ModelShape& shape, uint64_t seed,
                                                                     GpuModelOptions options) {
  KVF_GPU_MODEL_OK(check_options(shape, options));
  DeviceGuard guard(options.device);
  KVF_GPU_MODEL_OK(guard.status());
  auto impl = Impl::allocate(shape, options);
  if (!impl.ok()) return impl.status();
  Impl& m = *impl.value();
  const gpu::Dims& d = m.dims;
  const uint64_t h = d.hidden;
  const cudaStream_t s = m.s();
  // Tensor by tensor in ReferenceWeights::generate's order, which numbers the streams from 1.
  uint64_t index = 0;
  // Matrices are uniform [-1, 1) / sqrt(fan_in) (their rows are the inputs), the embedding [-1, 1).
  auto matrix = [&](bf16* dst, uint64_t rows, uint64_t cols, uint64_t ld) {
    gpu::fill_uniform_bf16(dst, rows, cols, ld, gpu::tensor_key(seed, ++index), matrix_scale(rows), s);
  };
  auto norm = [&](float* dst) { gpu::fill_norm(dst, h, gpu::tensor_key(seed, ++index), s); };
  gpu::fill_uniform_bf16(m.embedding, shape.vocab, h, h, gpu::tensor_key(seed, ++index), 1.0f, s);
  for (const LayerWeights& l : m.layers) {
    norm(l.attn_norm);
    matrix(l.wqkv, h, d.q_width(), d.qkv_width());
    matrix(l.wqkv + d.q_width(), h, d.kv_width(), d.qkv_width());
    matrix(l.wqkv + d.q_width() + d.kv_width(), h, d.kv_width(), d.qkv_width());
    matrix(l.wo, d.q_width(), h, h);
    norm(l.mlp_norm);
    matrix(l.w_gate_up, h, d.intermediate, 2 * uint64_t{d.intermediate});
    matrix(l.w_gate_up + d.intermediate, h, d.intermediate, 2 * uint64_t{d.intermediate});
    matrix(l.w_down, d.intermediate, h, h);
  }
  norm(m.final_norm);
  matrix(m.lm_head, h, shape.vocab, shape.vocab);
  KVF_GPU_MODEL_CUDA(cudaGetLastError());
  KVF_GPU_MODEL_CUDA(cudaStreamSynchronize(s));
  std::unique_ptr<GpuReferenceModel> model(new GpuReferenceModel(shape, options));
  model->impl_ = std::move(impl.value());
  return Result<std::unique_ptr<GpuReferenceModel>>(std::move(model));
}

Result<std::unique_ptr<GpuReferenceModel>> GpuReferenceModel::create_from(const ModelShape& shape,
                                                                          const ReferenceWeights& weights,
                                                                          GpuModelOptions options) {
  KVF_GPU_MODEL_OK(check_options(shape, options));
  KVF_GPU_MODEL_OK(check_weights(shape, weights));
  DeviceGuard guard(options.device);
  KVF_GPU_MODEL_OK(guard.status());
  auto impl = Impl::allocate(shape, options);
  if (!impl.ok()) return impl.status();
  Impl& m = *impl.value();
  const gpu::Dims& d = m.dims;
  const uint64_t h = d.hidden;
  const uint64_t qkv = d.qkv_width();
  const uint64_t gate_up = 2 * uint64_t{d.intermediate};
  const cudaStream_t s = m.s();
  KVF_GPU_MODEL_OK(upload_matrix(m.embedding, weights.embedding, shape.vocab, h, h, s));
  for (uint32_t i = 0; i < shape.layers; ++i) {
    const LayerWeights& l = m.layers[i];
    const ReferenceLayerWeights& src = weights.layers[i];
    KVF_GPU_MODEL_OK(upload_norm(l.attn_norm, src.attn_norm, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.wqkv, src.wq, h, d.q_width(), qkv, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.wqkv + d.q_width(), src.wk, h, d.kv_width(), qkv, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.wqkv + d.q_width() + d.kv_width(), src.wv, h, d.kv_width(), qkv, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.wo, src.wo, d.q_width(), h, h, s));
    KVF_GPU_MODEL_OK(upload_norm(l.mlp_norm, src.mlp_norm, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.w_gate_up, src.w_gate, h, d.intermediate, gate_up, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.w_gate_up + d.intermediate, src.w_up, h, d.intermediate, gate_up, s));
    KVF_GPU_MODEL_OK(upload_matrix(l.w_down, src.w_down, d.intermediate, h, h, s));
  }
  KVF_GPU_MODEL_OK(upload_norm(m.final_norm, weights.final_norm, s));
  KVF_GPU_MODEL_OK(upload_matrix(m.lm_head, weights.lm_head, h, shape.vocab, shape.vocab, s));
  KVF_GPU_MODEL_CUDA(cudaStreamSynchronize(s));
  std::unique_ptr<GpuReferenceModel> model(new GpuReferenceModel(shape, options));
  model->impl_ = std::move(impl.value());
  return Result<std::unique_ptr<GpuReferenceModel>>(std::move(model));
}

void* GpuReferenceModel::stream() const {
  return impl_->stream.handle();
}

uint64_t GpuReferenceModel::device_bytes() const {
  return impl_->weights.size() + impl_->norms.size() + impl_->workspace.size();
}

// --- validation --------------------------------------------------------------------------------------

Status GpuReferenceModel::check_cache(const KvCacheView& kv) const {
  if (Status s = check_kv_cache(shape_, kv); !s.ok()) return s;
  const uint64_t layer_bytes = kv.layout.layer_bytes();
  for (size_t l = 0; l < kv.layers.size(); ++l) {
    const std::string name = "KV layer buffer " + std::to_string(l);
    if (reinterpret_cast<uintptr_t>(kv.layers[l]) % 2 != 0)
      return invalid(name + " is not 2-byte aligned (bf16)");
    auto allocation = gpudirect::device_allocation_of(kv.layers[l]);
    if (!allocation.ok()) {
      return invalid(name + " is not device memory of GPU " + std::to_string(options_.device) + " (" +
                     allocation.status().message() + ")");
    }
    if (allocation->device != options_.device) {
      return invalid(name + " is memory of GPU " + std::to_string(allocation->device) +
                     ", the model runs on GPU " + std::to_string(options_.device));
    }
    const uint64_t offset = reinterpret_cast<uintptr_t>(kv.layers[l]) - allocation->base;
    if (layer_bytes > allocation->bytes - offset) {
      return invalid(name + ": its " + std::to_string(layer_bytes) +
                     " bytes run past the end of its allocation (" +
                     std::to_string(allocation->bytes - offset) + " bytes left after it)");
    }
  }
  return Status::Ok();
}

Status GpuReferenceModel::check_request(std::span<const uint32_t> tokens, uint64_t end_position,
                                        std::span<const uint32_t> block_table, const KvCacheView& kv) const {
  if (Status s = check_cache(kv); !s.ok()) return s;
  if (tokens.size() > options_.max_batch_tokens) {
    return invalid(std::to_string(tokens.size()) +
                   " positions in one call are over this model's max_batch_tokens of " +
                   std::to_string(options_.max_batch_tokens) + " (GpuModelOptions)");
  }
  if (end_position > options_.max_context) {
    return invalid("position " + std::to_string(end_position - 1) +
                   " is beyond this model's max_context of " + std::to_string(options_.max_context) +
                   " positions (GpuModelOptions)");
  }
  return check_tokens_and_table(shape_, tokens, end_position, block_table, kv.layout.desc().num_blocks);
}

// --- calls -------------------------------------------------------------------------------------------

Result<uint32_t> GpuReferenceModel::prefill(std::span<const uint32_t> tokens,
                                            std::span<const uint32_t> block_table, const KvCacheView& kv,
                                            const GpuLayerSavedFn& on_layer_saved,
                                            std::vector<float>* logits) {
  if (tokens.empty()) return invalid("prompt is empty: prefill needs at least one token");
  if (tokens.size() > UINT32_MAX)
    return invalid("prompt of " + std::to_string(tokens.size()) + " tokens is over 2^32");
  if (Status s = check_request(tokens, tokens.size(), block_table, kv); !s.ok()) return s;
  return forward(tokens, 0, block_table, kv, on_layer_saved, logits);
}

Result<uint32_t> GpuReferenceModel::prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                                 std::span<const uint32_t> block_table, const KvCacheView& kv,
                                                 const GpuLayerSavedFn& on_layer_saved,
                                                 std::vector<float>* logits) {
  if (tokens.empty()) return invalid("nothing after the prefix: prefill_from needs at least one token");
  const uint64_t end = uint64_t{start} + tokens.size();
  if (end > UINT32_MAX) return invalid("prompt of " + std::to_string(end) + " tokens is over 2^32");
  if (Status s = check_request(tokens, end, block_table, kv); !s.ok()) return s;
  return forward(tokens, start, block_table, kv, on_layer_saved, logits);
}

Result<uint32_t> GpuReferenceModel::decode_step(uint32_t position, uint32_t last_token,
                                                std::span<const uint32_t> block_table, const KvCacheView& kv,
                                                std::vector<float>* logits) {
  const uint32_t token[1] = {last_token};
  if (Status s = check_request(token, uint64_t{position} + 1, block_table, kv); !s.ok()) return s;
  return forward(token, position, block_table, kv, {}, logits);
}

Result<std::vector<uint32_t>> GpuReferenceModel::generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                                          std::span<const uint32_t> block_table,
                                                          const KvCacheView& kv) {
  if (prompt.empty()) return invalid("prompt is empty: generate needs at least one token");
  if (n_new == 0) return invalid("n_new is 0: nothing to generate");
  const uint64_t end = prompt.size() + uint64_t{n_new} - 1;  // the last generated token is not appended
  if (end > UINT32_MAX) return invalid("prompt plus new tokens (" + std::to_string(end) + ") is over 2^32");
  if (Status s = check_request(prompt, end, block_table, kv); !s.ok()) return s;
  std::vector<uint32_t> out;
  out.reserve(n_new);
  auto first = forward(prompt, 0, block_table, kv, {}, nullptr);
  if (!first.ok()) return first.status();
  out.push_back(*first);
  for (uint32_t i = 1; i < n_new; ++i) {
    const auto position = static_cast<uint32_t>(prompt.size() + i - 1);
    auto next = forward(std::span<const uint32_t>(&out.back(), 1), position, block_table, kv, {}, nullptr);
    if (!next.ok()) return next.status();
    out.push_back(*next);
  }
  return out;
}

Result<uint32_t> GpuReferenceModel::forward(std::span<const uint32_t> tokens, uint32_t first_position,
                                            std::span<const uint32_t> block_table, const KvCacheView& kv,
                                            const GpuLayerSavedFn& on_layer_saved,
                                            std::vector<float>* logits) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  KVF_GPU_MODEL_OK(guard.status());
  const auto rows = static_cast<uint32_t>(tokens.size());
  const uint64_t blocks = blocks_for(uint64_t{first_position} + rows, shape_.block_tokens);
  // The previous call synchronized the stream, so no copy still reads the staging.
  std::copy(tokens.begin(), tokens.end(), m.host_tokens);
  std::copy(block_table.begin(), block_table.begin() + static_cast<std::ptrdiff_t>(blocks), m.host_table);
  Status enqueued = [&]() -> Status {
    KVF_GPU_MODEL_CUDA(
        cudaMemcpyAsync(m.tokens, m.host_tokens, rows * sizeof(uint32_t), cudaMemcpyHostToDevice, m.s()));
    KVF_GPU_MODEL_CUDA(
        cudaMemcpyAsync(m.table, m.host_table, blocks * sizeof(uint32_t), cudaMemcpyHostToDevice, m.s()));
    return m.enqueue_forward(rows, first_position, kv, on_layer_saved, logits);
  }();
  // Always: nothing of this call may still run when it returns (the staging is reused, and the
  // caller may free the cache), whatever failed.
  const cudaError_t synced = cudaStreamSynchronize(m.s());
  if (!enqueued.ok()) return enqueued;
  if (synced != cudaSuccess) return cuda_failure("cudaStreamSynchronize (the forward pass)", synced);
  return *m.host_next_token;
}

Status GpuReferenceModel::Impl::enqueue_forward(uint32_t rows, uint32_t first_position, const KvCacheView& kv,
                                                const GpuLayerSavedFn& on_layer_saved,
                                                std::vector<float>* logits) {
  const gpu::Dims& d = dims;
  const cudaStream_t st = s();
  const gpu::KvAddressing addressing = addressing_of(kv.layout);
  const uint32_t end = first_position + rows;
  gpu::embed(tokens, rows, embedding, d.hidden, x, st);
  for (uint32_t l = 0; l < layers.size(); ++l) {
    const LayerWeights& w = layers[l];
    uint8_t* layer = kv.layers[l];
    gpu::rms_norm(x, rows, d.hidden, w.attn_norm, kRmsNormEps, xn, st);
    KVF_GPU_MODEL_OK(gemm(cublas, xn, w.wqkv, proj, CUDA_R_32F, rows, d.hidden, d.qkv_width(), 0.0f));
    gpu::rope_and_write_kv(proj, rows, first_position, d, rope, q_grouped, layer, table, addressing, st);
    KVF_GPU_MODEL_CUDA(cudaGetLastError());
    // The layer's K/V writes are enqueued; attention reads every K/V back from the cache (bf16),
    // its own positions' too, so a decode engine that continues from a copied cache sees exactly
    // what this call saw.
    if (on_layer_saved) on_layer_saved(l, stream.handle());
    const bool vector_copy = reinterpret_cast<uintptr_t>(layer) % 16 == 0 && addressing.key_base % 16 == 0 &&
                             addressing.value_base % 16 == 0 && addressing.block_stride % 16 == 0 &&
                             addressing.token_bytes % 16 == 0;
    gpu::gather_kv(layer, table, addressing, end, vector_copy, keys, values, st);
    KVF_GPU_MODEL_OK(attention(rows, first_position));
    gpu::ungroup_heads(o_grouped, rows, d, attn, st);
    KVF_GPU_MODEL_OK(gemm(cublas, attn, w.wo, x, CUDA_R_32F, rows, d.q_width(), d.hidden, 1.0f));
    gpu::rms_norm(x, rows, d.hidden, w.mlp_norm, kRmsNormEps, xn, st);
    KVF_GPU_MODEL_OK(
        gemm(cublas, xn, w.w_gate_up, proj, CUDA_R_32F, rows, d.hidden, 2 * d.intermediate, 0.0f));
    gpu::swiglu(proj, rows, d.intermediate, act, st);
    KVF_GPU_MODEL_OK(gemm(cublas, act, w.w_down, x, CUDA_R_32F, rows, d.intermediate, d.hidden, 1.0f));
    KVF_GPU_MODEL_CUDA(cudaGetLastError());
  }
  // Only the last position's next token is wanted.
  gpu::rms_norm(x + uint64_t{rows - 1} * d.hidden, 1, d.hidden, final_norm, kRmsNormEps, xn, st);
  KVF_GPU_MODEL_OK(gemm(cublas, xn, lm_head, vocab_logits, CUDA_R_32F, 1, d.hidden, vocab, 0.0f));
  gpu::argmax(vocab_logits, vocab, next_token, st);
  KVF_GPU_MODEL_CUDA(cudaGetLastError());
  KVF_GPU_MODEL_CUDA(
      cudaMemcpyAsync(host_next_token, next_token, sizeof(uint32_t), cudaMemcpyDeviceToHost, st));
  if (logits != nullptr) {
    logits->resize(vocab);
    KVF_GPU_MODEL_CUDA(
        cudaMemcpyAsync(logits->data(), vocab_logits, vocab * sizeof(float), cudaMemcpyDeviceToHost, st));
  }
  return Status::Ok();
}

// Causal GQA of the call's rows over keys [0, end) gathered from the cache, one query tile at a
// time: per tile, S = scale * Q K^T over the keys up to the tile's last position (one batched GEMM
// over the KV heads, each with its group of query heads as rows * group rows), the causal softmax,
// and O = P V into the grouped output.
Status GpuReferenceModel::Impl::attention(uint32_t rows, uint32_t first_position) {
  const gpu::Dims& d = dims;
  const uint32_t group = d.group();
  const uint32_t end = first_position + rows;
  const uint64_t per_row = uint64_t{d.q_heads} * round_up(end, kScoreRowAlign);
  const auto tile_rows = static_cast<uint32_t>(std::clamp<uint64_t>(score_capacity / per_row, 1, rows));
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));
  const float one = 1.0f;
  const float zero = 0.0f;
  const auto head_dim = static_cast<int>(d.head_dim);
  const auto kv_width = static_cast<int>(d.kv_width());
  // Between KV heads in the grouped layout over the call's rows.
  const long long grouped_stride = static_cast<long long>(rows) * group * d.head_dim;
  for (uint32_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const uint32_t tile = std::min(tile_rows, rows - r0);
    const uint32_t keys_count = first_position + r0 + tile;  // up to the tile's last position
    const auto ld = static_cast<uint32_t>(round_up(keys_count, kScoreRowAlign));
    const auto m = static_cast<int>(tile * group);  // query rows per KV head
    const uint64_t q_offset = uint64_t{r0} * group * d.head_dim;
    // Column-major: S^T[keys][m] = K[keys][head_dim] Q^T. K of KV head g is the cache's keys at
    // column g * head_dim, lda kv_width (A transposed); Q^T of its m rows is contiguous, ldb head_dim.
    KVF_GPU_MODEL_CUBLAS(cublasGemmStridedBatchedEx(
        cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(keys_count), m, head_dim, &scale, keys,
        CUDA_R_16BF, kv_width, head_dim, q_grouped + q_offset, CUDA_R_16BF, head_dim, grouped_stride, &zero,
        scores, CUDA_R_32F, static_cast<int>(ld), static_cast<long long>(m) * ld,
        static_cast<int>(d.kv_heads), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    gpu::causal_softmax(scores, d.kv_heads, tile, group, keys_count, ld, first_position + r0, probs, s());
    // Column-major: O^T[head_dim][m] = V^T[head_dim][keys] P^T[keys][m].
    KVF_GPU_MODEL_CUBLAS(cublasGemmStridedBatchedEx(
        cublas, CUBLAS_OP_N, CUBLAS_OP_N, head_dim, m, static_cast<int>(keys_count), &one, values,
        CUDA_R_16BF, kv_width, head_dim, probs, CUDA_R_16BF, static_cast<int>(ld),
        static_cast<long long>(m) * ld, &zero, o_grouped + q_offset, CUDA_R_16BF, head_dim, grouped_stride,
        static_cast<int>(d.kv_heads), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  return Status::Ok();
}

}  // namespace kvf::engines
