#include "kvf/engines/reference_model.h"

#include <algorithm>
#include <string>

#include "kvf/engines/host_kv_pool.h"
#include "kvf/engines/reference_kernels.h"
#include "request_checks.h"

namespace kvf::engines {

namespace {

Status invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

uint64_t blocks_for(uint64_t tokens, uint32_t block_tokens) {
  return (tokens + block_tokens - 1) / block_tokens;
}

}  // namespace

Result<ReferenceModel> ReferenceModel::create(const ModelShape& shape, uint64_t seed,
                                              uint64_t max_weight_bytes) {
  if (Status s = shape.validate(); !s.ok()) return s;
  const uint64_t bytes = shape.parameter_count() * sizeof(float);
  if (bytes > max_weight_bytes) {
    return invalid("model shape (" + shape.to_string() + ") has " + std::to_string(bytes >> 20) +
                   " MiB of fp32 weights, over this CPU engine's limit of " +
                   std::to_string(max_weight_bytes >> 20) + " MiB (large shapes are for the GPU engine)");
  }
  return ReferenceModel(shape, seed, ReferenceWeights::generate(shape, seed));
}

Status ReferenceModel::check_cache(const KvCacheView& kv) const {
  return check_kv_cache(shape_, kv);
}

Status ReferenceModel::check_request(std::span<const uint32_t> tokens, uint64_t end_position,
                                     std::span<const uint32_t> block_table, const KvCacheView& kv) const {
  if (Status s = check_cache(kv); !s.ok()) return s;
  return check_tokens_and_table(shape_, tokens, end_position, block_table, kv.layout.desc().num_blocks);
}

Result<uint32_t> ReferenceModel::prefill(std::span<const uint32_t> tokens,
                                         std::span<const uint32_t> block_table, const KvCacheView& kv,
                                         const LayerSavedFn& on_layer_saved,
                                         std::vector<float>* logits) const {
  if (tokens.empty()) return invalid("prompt is empty: prefill needs at least one token");
  if (tokens.size() > UINT32_MAX)
    return invalid("prompt of " + std::to_string(tokens.size()) + " tokens is over 2^32");
  if (Status s = check_request(tokens, tokens.size(), block_table, kv); !s.ok()) return s;
  return forward(tokens, 0, block_table, kv, on_layer_saved, logits);
}

Result<uint32_t> ReferenceModel::prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                              std::span<const uint32_t> block_table, const KvCacheView& kv,
                                              const LayerSavedFn& on_layer_saved,
                                              std::vector<float>* logits) const {
  if (tokens.empty()) return invalid("nothing after the prefix: prefill_from needs at least one token");
  const uint64_t end = uint64_t{start} + tokens.size();
  if (end > UINT32_MAX) return invalid("prompt of " + std::to_string(end) + " tokens is over 2^32");
  if (Status s = check_request(tokens, end, block_table, kv); !s.ok()) return s;
  return forward(tokens, start, block_table, kv, on_layer_saved, logits);
}

Result<uint32_t> ReferenceModel::decode_step(uint32_t position, uint32_t last_token,
                                             std::span<const uint32_t> block_table, const KvCacheView& kv,
                                             std::vector<float>* logits) const {
  const uint32_t token[1] = {last_token};
  if (Status s = check_request(token, uint64_t{position} + 1, block_table, kv); !s.ok()) return s;
  return forward(token, position, block_table, kv, {}, logits);
}

Result<std::vector<uint32_t>> ReferenceModel::generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                                       std::span<const uint32_t> block_table,
                                                       const KvCacheView& kv) const {
  if (prompt.empty()) return invalid("prompt is empty: generate needs at least one token");
  if (n_new == 0) return invalid("n_new is 0: nothing to generate");
  const uint64_t end = prompt.size() + uint64_t{n_new} - 1;  // the last generated token is not appended
  if (end > UINT32_MAX) return invalid("prompt plus new tokens (" + std::to_string(end) + ") is over 2^32");
  if (Status s = check_request(prompt, end, block_table, kv); !s.ok()) return s;
  std::vector<uint32_t> out;
  out.reserve(n_new);
  out.push_back(forward(prompt, 0, block_table, kv, {}, nullptr));
  for (uint32_t i = 1; i < n_new; ++i) {
    const auto position = static_cast<uint32_t>(prompt.size() + i - 1);
    out.push_back(forward(std::span<const uint32_t>(&out.back(), 1), position, block_table, kv, {}, nullptr));
  }
  return out;
}

Result<std::vector<uint32_t>> ReferenceModel::generate(std::span<const uint32_t> prompt,
                                                       uint32_t n_new) const {
  if (prompt.empty()) return invalid("prompt is empty: generate needs at least one token");
  if (n_new == 0) return invalid("n_new is 0: nothing to generate");
  const uint64_t blocks = blocks_for(prompt.size() + uint64_t{n_new} - 1, shape_.block_tokens);
  if (blocks > UINT32_MAX) return invalid("prompt plus new tokens need more than 2^32 blocks");
  auto pool = HostKvPool::create(shape_.kv_layout_desc(static_cast<uint32_t>(blocks)));
  if (!pool.ok()) return pool.status();
  std::vector<uint32_t> table(blocks);
  for (uint32_t b = 0; b < table.size(); ++b) table[b] = b;
  return generate(prompt, n_new, table, pool->view());
}

uint32_t ReferenceModel::forward(std::span<const uint32_t> tokens, uint32_t first_position,
                                 std::span<const uint32_t> block_table, const KvCacheView& kv,
                                 const LayerSavedFn& on_layer_saved, std::vector<float>* logits) const {
  const ModelShape& s = shape_;
  const auto n = static_cast<uint32_t>(tokens.size());
  const uint32_t h = s.hidden;
  const uint32_t qd = s.q_heads * s.head_dim;
  const uint32_t kvd = s.kv_heads * s.head_dim;
  const uint32_t inter = s.intermediate;
  auto rows = [n](uint32_t width) { return std::vector<float>(uint64_t{n} * width); };
  std::vector<float> x = rows(h), xn = rows(h), q = rows(qd), k = rows(kvd), v = rows(kvd), attn = rows(qd),
                     proj = rows(h), gate = rows(inter), up = rows(inter);
  auto row = [](std::vector<float>& m, uint32_t width, uint32_t r) {
    return std::span<float>(m.data() + uint64_t{r} * width, width);
  };
  auto add = [](std::vector<float>& into, const std::vector<float>& delta) {
    for (size_t i = 0; i < into.size(); ++i) into[i] += delta[i];
  };

  for (uint32_t r = 0; r < n; ++r) {
    const float* e = weights_.embedding.data() + uint64_t{tokens[r]} * h;
    std::copy(e, e + h, row(x, h, r).begin());
  }
  for (uint32_t l = 0; l < s.layers; ++l) {
    const ReferenceLayerWeights& w = weights_.layers[l];
    uint8_t* layer = kv.layers[l];
    for (uint32_t r = 0; r < n; ++r)
      reference::rms_norm(row(x, h, r), w.attn_norm, kRmsNormEps, row(xn, h, r));
    reference::matmul(xn.data(), n, h, w.wq.data(), qd, q.data());
    reference::matmul(xn.data(), n, h, w.wk.data(), kvd, k.data());
    reference::matmul(xn.data(), n, h, w.wv.data(), kvd, v.data());
    for (uint32_t r = 0; r < n; ++r) {
      const uint64_t position = uint64_t{first_position} + r;
      reference::apply_rope(row(q, qd, r).data(), s.q_heads, s.head_dim, position, kRopeTheta);
      reference::apply_rope(row(k, kvd, r).data(), s.kv_heads, s.head_dim, position, kRopeTheta);
      reference::write_kv(layer, kv.layout, block_table, position, row(k, kvd, r).data(),
                          row(v, kvd, r).data());
    }
    // Attention reads every K/V back from the cache (bf16), its own token's too, so a decode engine
    // that continues from a copied cache sees exactly what the prefill engine saw.
    if (on_layer_saved) on_layer_saved(l);
    for (uint32_t r = 0; r < n; ++r) {
      reference::paged_attention(row(q, qd, r).data(), s.q_heads, uint64_t{first_position} + r, layer,
                                 kv.layout, block_table, row(attn, qd, r).data());
    }
    reference::matmul(attn.data(), n, qd, w.wo.data(), h, proj.data());
    add(x, proj);
    for (uint32_t r = 0; r < n; ++r)
      reference::rms_norm(row(x, h, r), w.mlp_norm, kRmsNormEps, row(xn, h, r));
    reference::matmul(xn.data(), n, h, w.w_gate.data(), inter, gate.data());
    reference::matmul(xn.data(), n, h, w.w_up.data(), inter, up.data());
    reference::swiglu(gate, up);
    reference::matmul(gate.data(), n, inter, w.w_down.data(), h, proj.data());
    add(x, proj);
  }
  // Only the last position's next token is wanted.
  std::vector<float> last(h);
  reference::rms_norm(row(x, h, n - 1), weights_.final_norm, kRmsNormEps, last);
  std::vector<float> out(s.vocab);
  reference::matmul(last.data(), 1, h, weights_.lm_head.data(), s.vocab, out.data());
  const uint32_t token = reference::argmax(out);
  if (logits != nullptr) *logits = std::move(out);
  return token;
}

}  // namespace kvf::engines
