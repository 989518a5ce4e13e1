#include "kvf/engines/model_shape.h"

#include <algorithm>

namespace kvf::engines {

ModelShape ModelShape::tiny() {
  return {4, 256, 8, 2, 32, 512, 1024, 16};
}

ModelShape ModelShape::llama3_8b() {
  return {32, 4096, 32, 8, 128, 14336, 128256, 16};
}

Status ModelShape::validate() const {
  const struct {
    const char* name;
    uint32_t value;
  } dims[] = {{"layers", layers},     {"hidden", hidden},
              {"q_heads", q_heads},   {"kv_heads", kv_heads},
              {"head_dim", head_dim}, {"intermediate", intermediate},
              {"vocab", vocab},       {"block_tokens", block_tokens}};
  for (const auto& d : dims) {
    if (d.value == 0)
      return Status(ErrorCode::kInvalidArgument, std::string("model shape: ") + d.name + " is 0");
  }
  if (q_heads % kv_heads != 0) {
    return Status(ErrorCode::kInvalidArgument, "model shape: q_heads " + std::to_string(q_heads) +
                                                   " is not a multiple of kv_heads " +
                                                   std::to_string(kv_heads));
  }
  if (head_dim % 2 != 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "model shape: head_dim " + std::to_string(head_dim) + " is odd (RoPE rotates pairs)");
  }
  // A weight matrix is at most widest^2 floats: with widths within 2^24 no index product overflows
  // uint64 (and the CPU engine's weight limit refuses anything that large long before).
  const uint64_t widest =
      std::max({uint64_t{hidden}, uint64_t{q_heads} * head_dim, uint64_t{intermediate}, uint64_t{vocab}});
  if (widest > (uint64_t{1} << 24)) {
    return Status(ErrorCode::kInvalidArgument,
                  "model shape: a width of " + std::to_string(widest) + " exceeds 2^24");
  }
  return Status::Ok();
}

uint64_t ModelShape::parameter_count() const {
  const uint64_t h = hidden;
  const uint64_t qd = uint64_t{q_heads} * head_dim;
  const uint64_t kvd = uint64_t{kv_heads} * head_dim;
  const uint64_t per_layer = 2 * h                                    // the two RMSNorm weights
                             + h * qd + 2 * h * kvd + qd * h          // Wq, Wk, Wv, Wo
                             + 3 * h * intermediate;                  // gate, up, down
  return uint64_t{layers} * per_layer + 2 * uint64_t{vocab} * h + h;  // embedding, LM head, final norm
}

protocol::KvLayoutDesc ModelShape::kv_layout_desc(uint32_t num_blocks) const {
  return {protocol::KvLayoutKind::kFlashAttention,
          layers,
          num_blocks,
          block_tokens,
          kv_heads,
          head_dim,
          kKvDtypeBytes};
}

std::string ModelShape::to_string() const {
  return "layers " + std::to_string(layers) + ", hidden " + std::to_string(hidden) + ", q_heads " +
         std::to_string(q_heads) + ", kv_heads " + std::to_string(kv_heads) + ", head_dim " +
         std::to_string(head_dim) + ", intermediate " + std::to_string(intermediate) + ", vocab " +
         std::to_string(vocab) + ", block_tokens " + std::to_string(block_tokens);
}

}  // namespace kvf::engines
