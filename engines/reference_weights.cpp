#include "kvf/engines/reference_weights.h"

#include <cmath>

namespace kvf::engines {

namespace {

// splitmix64 (Steele, Lea, Flood): fully specified integer arithmetic, unlike the standard
// library's distributions, whose outputs differ between implementations.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1): the top 24 bits, scaled by 2^-23 and shifted, are exact in a float.
  float symmetric() { return static_cast<float>(next() >> 40) * 0x1.0p-23f - 1.0f; }

 private:
  uint64_t state_;
};

class TensorFactory {
 public:
  explicit TensorFactory(uint64_t seed) : seed_(seed) {}

  std::vector<float> uniform(uint64_t count, float scale) {
    SplitMix64 rng(stream_seed());
    std::vector<float> out(count);
    for (float& v : out) v = rng.symmetric() * scale;
    return out;
  }
  std::vector<float> matrix(uint64_t in, uint64_t out) {
    return uniform(in * out, static_cast<float>(1.0 / std::sqrt(static_cast<double>(in))));
  }
  std::vector<float> norm(uint64_t count) {
    std::vector<float> out = uniform(count, 0.1f);
    for (float& v : out) v += 1.0f;
    return out;
  }

 private:
  // The tensor's own stream: the seed and the tensor's index, mixed once more so that neighbouring
  // seeds and indices start far apart.
  uint64_t stream_seed() {
    SplitMix64 mix(seed_ ^ (0xD1B54A32D192ED03ull * ++tensor_index_));
    return mix.next();
  }

  uint64_t seed_;
  uint64_t tensor_index_ = 0;
};

}  // namespace

ReferenceWeights ReferenceWeights::generate(const ModelShape& shape, uint64_t seed) {
  TensorFactory f(seed);
  const uint64_t h = shape.hidden;
  const uint64_t qd = uint64_t{shape.q_heads} * shape.head_dim;
  const uint64_t kvd = uint64_t{shape.kv_heads} * shape.head_dim;
  ReferenceWeights w;
  w.embedding = f.uniform(uint64_t{shape.vocab} * h, 1.0f);
  w.layers.resize(shape.layers);
  for (ReferenceLayerWeights& l : w.layers) {
    l.attn_norm = f.norm(h);
    l.wq = f.matrix(h, qd);
    l.wk = f.matrix(h, kvd);
    l.wv = f.matrix(h, kvd);
    l.wo = f.matrix(qd, h);
    l.mlp_norm = f.norm(h);
    l.w_gate = f.matrix(h, shape.intermediate);
    l.w_up = f.matrix(h, shape.intermediate);
    l.w_down = f.matrix(shape.intermediate, h);
  }
  w.final_norm = f.norm(h);
  w.lm_head = f.matrix(h, shape.vocab);
  return w;
}

}  // namespace kvf::engines
