// The CPU reference engine: its attention over a paged, shuffled bf16 cache against a dense one
// written here; the whole decoder against a dense forward pass written here from the same weights;
// disaggregation (a second engine decodes from copied blocks exactly as the first does, and a
// corrupted block shows); every validation; determinism of the seeded weights.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/engines/host_kv_pool.h"
#include "kvf/engines/reference_kernels.h"
#include "kvf/engines/reference_model.h"

using namespace kvf;
using namespace kvf::engines;
using protocol::KvLayout;
using protocol::KvPart;

namespace {

// The test's own generator (the standard library's shuffles differ between implementations).
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t n) { return static_cast<uint32_t>(next() % n); }
  float uniform() { return static_cast<float>(next() >> 40) * 0x1.0p-23f - 1.0f; }
};

// `count` distinct block ids out of `num_blocks`, in a random order.
std::vector<uint32_t> shuffled_table(uint32_t count, uint32_t num_blocks, uint64_t seed) {
  std::vector<uint32_t> all(num_blocks);
  for (uint32_t b = 0; b < num_blocks; ++b) all[b] = b;
  Rng rng{seed};
  for (uint32_t i = num_blocks - 1; i > 0; --i) std::swap(all[i], all[rng.below(i + 1)]);
  all.resize(count);
  return all;
}

std::vector<uint32_t> make_prompt(uint32_t length, uint32_t vocab, uint64_t seed) {
  Rng rng{seed};
  std::vector<uint32_t> tokens(length);
  for (uint32_t& t : tokens) t = rng.below(vocab);
  return tokens;
}

ReferenceModel make_model(uint64_t seed, const ModelShape& shape = ModelShape::tiny()) {
  auto model = ReferenceModel::create(shape, seed);
  INFO(model.status().to_string());
  REQUIRE(model.ok());
  return std::move(model.value());
}

HostKvPool make_pool(const ModelShape& shape, uint32_t num_blocks, uint8_t fill) {
  auto pool = HostKvPool::create(shape.kv_layout_desc(num_blocks), fill);
  INFO(pool.status().to_string());
  REQUIRE(pool.ok());
  return std::move(pool.value());
}

uint32_t blocks_for(uint64_t tokens, uint32_t block_tokens) {
  return static_cast<uint32_t>((tokens + block_tokens - 1) / block_tokens);
}

// max |a - b| over max |b|: the relative error of a whole vector.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return scale == 0 ? diff : diff / scale;
}

// --- dense, naive reference implementations (row-major [token][head][dim]) ------------------------

// Writes a dense [tokens][kv_heads][head_dim] K or V array into a paged layer buffer, addressed by
// KvLayout::extent alone (not the engine's kv_slot).
void scatter_dense(const std::vector<float>& dense, uint64_t tokens, const KvLayout& layout,
                   const std::vector<uint32_t>& table, KvPart part, uint8_t* layer) {
  const auto& d = layout.desc();
  const uint64_t row = uint64_t{d.kv_heads} * d.head_dim;
  for (uint64_t t = 0; t < tokens; ++t) {
    uint8_t* slot =
        layer + layout.extent(table[t / d.block_tokens], part).offset + (t % d.block_tokens) * row * 2;
    for (uint64_t i = 0; i < row; ++i) {
      const uint16_t b = reference::to_bf16(dense[t * row + i]);
      std::memcpy(slot + 2 * i, &b, 2);
    }
  }
}

// Causal GQA of one query at `position` over dense K/V, in double.
std::vector<float> dense_attention(const std::vector<float>& q, uint32_t q_heads, uint32_t kv_heads,
                                   uint32_t dim, uint64_t position, const std::vector<float>& k,
                                   const std::vector<float>& v) {
  std::vector<float> out(uint64_t{q_heads} * dim);
  const uint32_t group = q_heads / kv_heads;
  for (uint32_t hq = 0; hq < q_heads; ++hq) {
    const uint32_t g = hq / group;
    std::vector<double> scores(position + 1);
    for (uint64_t t = 0; t <= position; ++t) {
      double dot = 0;
      for (uint32_t i = 0; i < dim; ++i) dot += double{q[hq * dim + i]} * k[(t * kv_heads + g) * dim + i];
      scores[t] = dot / std::sqrt(double(dim));
    }
    const double max = *std::max_element(scores.begin(), scores.end());
    double sum = 0;
    for (double& s : scores) sum += (s = std::exp(s - max));
    for (uint32_t i = 0; i < dim; ++i) {
      double acc = 0;
      for (uint64_t t = 0; t <= position; ++t) acc += scores[t] / sum * v[(t * kv_heads + g) * dim + i];
      out[hq * dim + i] = static_cast<float>(acc);
    }
  }
  return out;
}

// y = x W for one row, W input-major, summing in input order.
std::vector<float> dense_matvec(const std::vector<float>& x, const std::vector<float>& w, uint32_t out) {
  std::vector<float> y(out);
  for (uint32_t o = 0; o < out; ++o) {
    float sum = 0.0f;
    for (size_t i = 0; i < x.size(); ++i) sum += x[i] * w[i * out + o];
    y[o] = sum;
  }
  return y;
}

std::vector<float> dense_rms_norm(const std::vector<float>& x, const std::vector<float>& w) {
  float ss = 0.0f;
  for (float v : x) ss += v * v;
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(x.size()) + kRmsNormEps);
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * inv * w[i];
  return out;
}

// Llama's rotate_half: (x1, x2) = (first half, second half) of each head;
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
void dense_rope(std::vector<float>& x, uint32_t heads, uint32_t dim, uint64_t position) {
  const uint32_t half = dim / 2;
  for (uint32_t h = 0; h < heads; ++h) {
    float* head = x.data() + h * dim;
    std::vector<float> rotated(dim);
    for (uint32_t i = 0; i < dim; ++i) rotated[i] = i < half ? -head[i + half] : head[i - half];
    for (uint32_t i = 0; i < dim; ++i) {
      const double inv_freq = std::pow(kRopeTheta, -2.0 * (i % half) / dim);
      const double angle = static_cast<double>(position) * inv_freq;
      head[i] =
          head[i] * static_cast<float>(std::cos(angle)) + rotated[i] * static_cast<float>(std::sin(angle));
    }
  }
}

// The whole decoder over a prompt, dense and one token at a time, K/V rounded to bf16 as the engine
// stores them: the last position's logits.
std::vector<float> dense_forward(const ReferenceModel& model, const std::vector<uint32_t>& tokens) {
  const ModelShape& s = model.shape();
  const ReferenceWeights& w = model.weights();
  const uint32_t qd = s.q_heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  const size_t n = tokens.size();
  std::vector<std::vector<float>> x(n);
  for (size_t t = 0; t < n; ++t) {
    x[t].assign(w.embedding.begin() + static_cast<long>(tokens[t] * s.hidden),
                w.embedding.begin() + static_cast<long>((tokens[t] + 1) * s.hidden));
  }
  for (uint32_t l = 0; l < s.layers; ++l) {
    const ReferenceLayerWeights& lw = w.layers[l];
    std::vector<float> k_cache(n * kvd), v_cache(n * kvd);
    std::vector<std::vector<float>> q(n);
    for (size_t t = 0; t < n; ++t) {
      const std::vector<float> xn = dense_rms_norm(x[t], lw.attn_norm);
      q[t] = dense_matvec(xn, lw.wq, qd);
      std::vector<float> k = dense_matvec(xn, lw.wk, kvd), v = dense_matvec(xn, lw.wv, kvd);
      dense_rope(q[t], s.q_heads, s.head_dim, t);
      dense_rope(k, s.kv_heads, s.head_dim, t);
      for (uint32_t i = 0; i < kvd; ++i) {
        k_cache[t * kvd + i] = reference::round_to_bf16(k[i]);
        v_cache[t * kvd + i] = reference::round_to_bf16(v[i]);
      }
    }
    for (size_t t = 0; t < n; ++t) {
      const std::vector<float> attn =
          dense_attention(q[t], s.q_heads, s.kv_heads, s.head_dim, t, k_cache, v_cache);
      const std::vector<float> o = dense_matvec(attn, lw.wo, s.hidden);
      for (uint32_t i = 0; i < s.hidden; ++i) x[t][i] += o[i];
      const std::vector<float> xn = dense_rms_norm(x[t], lw.mlp_norm);
      std::vector<float> gate = dense_matvec(xn, lw.w_gate, s.intermediate);
      const std::vector<float> up = dense_matvec(xn, lw.w_up, s.intermediate);
      for (uint32_t i = 0; i < s.intermediate; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      const std::vector<float> down = dense_matvec(gate, lw.w_down, s.hidden);
      for (uint32_t i = 0; i < s.hidden; ++i) x[t][i] += down[i];
    }
  }
  return dense_matvec(dense_rms_norm(x[n - 1], w.final_norm), w.lm_head, s.vocab);
}

// Copies the first `blocks` blocks of a request, K and V of every layer, from one pool under table
// `from` to another under table `to`: what a PD transfer does.
void copy_blocks(HostKvPool& src, const std::vector<uint32_t>& from, HostKvPool& dst,
                 const std::vector<uint32_t>& to, uint32_t blocks) {
  for (uint32_t l = 0; l < src.layout().desc().num_layers; ++l) {
    for (uint32_t i = 0; i < blocks; ++i) {
      for (KvPart part : {KvPart::kKey, KvPart::kValue}) {
        const auto s = src.layout().extent(from[i], part);
        const auto d = dst.layout().extent(to[i], part);
        REQUIRE(s.length == d.length);
        std::memcpy(dst.layer(l) + d.offset, src.layer(l) + s.offset, s.length);
      }
    }
  }
}

bool all_bytes_are(HostKvPool& pool, uint8_t value) {
  for (uint32_t l = 0; l < pool.layout().desc().num_layers; ++l) {
    const uint8_t* p = pool.layer(l);
    if (!std::all_of(p, p + pool.layout().layer_bytes(), [value](uint8_t b) { return b == value; }))
      return false;
  }
  return true;
}

}  // namespace

// --- kernels ---------------------------------------------------------------------------------------

TEST_CASE("bf16: round to nearest, ties to even; NaN stays NaN") {
  using reference::to_bf16;
  REQUIRE(to_bf16(1.0f) == 0x3F80);
  REQUIRE(to_bf16(1.0f + 0x1.0p-8f) == 0x3F80);               // halfway, 0x3F80 is even
  REQUIRE(to_bf16(1.0f + 3 * 0x1.0p-8f) == 0x3F82);           // halfway, 0x3F82 is even
  REQUIRE(to_bf16(1.0f + 0x1.0p-8f + 0x1.0p-20f) == 0x3F81);  // just above halfway
  REQUIRE(to_bf16(-2.0f) == 0xC000);
  REQUIRE(to_bf16(INFINITY) == 0x7F80);
  REQUIRE(std::isnan(reference::from_bf16(to_bf16(NAN))));
  REQUIRE(reference::from_bf16(0x3F81) == 1.0f + 0x1.0p-7f);
}

TEST_CASE("argmax: ties go to the lowest token id, NaN never wins") {
  REQUIRE(reference::argmax(std::vector<float>{1, 3, 3, 2}) == 1);
  REQUIRE(reference::argmax(std::vector<float>{NAN, -1, -1}) == 1);
  REQUIRE(reference::argmax(std::vector<float>{-5}) == 0);
}

TEST_CASE("attention over a paged, shuffled bf16 cache equals dense attention") {
  // 8 query heads over 2 KV heads of dim 32, 16-token blocks, 100 tokens in 7 of 20 blocks.
  const ModelShape shape = ModelShape::tiny();
  const uint32_t tokens = 100;
  HostKvPool pool = make_pool(shape, 20, 0xFF);
  const std::vector<uint32_t> table = shuffled_table(blocks_for(tokens, shape.block_tokens), 20, 11);
  const uint32_t kvd = shape.kv_heads * shape.head_dim, qd = shape.q_heads * shape.head_dim;
  Rng rng{3};
  std::vector<float> k(tokens * kvd), v(tokens * kvd);
  // Dense copies hold what the cache holds: the bf16 values.
  for (float& x : k) x = reference::round_to_bf16(2.0f * rng.uniform());
  for (float& x : v) x = reference::round_to_bf16(rng.uniform());
  scatter_dense(k, tokens, pool.layout(), table, KvPart::kKey, pool.layer(0));
  scatter_dense(v, tokens, pool.layout(), table, KvPart::kValue, pool.layer(0));

  for (uint64_t position : {0, 1, 15, 16, 17, 63, 64, 99}) {
    std::vector<float> q(qd);
    for (float& x : q) x = 2.0f * rng.uniform();
    std::vector<float> paged(qd);
    reference::paged_attention(q.data(), shape.q_heads, position, pool.layer(0), pool.layout(), table,
                               paged.data());
    const std::vector<float> dense =
        dense_attention(q, shape.q_heads, shape.kv_heads, shape.head_dim, position, k, v);
    INFO("position " << position);
    REQUIRE(relative_error(paged, dense) < 1e-5);
  }
}

TEST_CASE("the decoder equals a dense forward pass over the same weights") {
  const ReferenceModel model = make_model(5);
  const ModelShape& shape = model.shape();
  for (uint32_t length : {1u, 17u, 40u}) {
    const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, length);
    HostKvPool pool = make_pool(shape, 8, 0xFF);
    const std::vector<uint32_t> table = shuffled_table(blocks_for(length, shape.block_tokens), 8, 99);
    std::vector<float> logits;
    auto token = model.prefill(prompt, table, pool.view(), {}, &logits);
    REQUIRE(token.ok());
    const std::vector<float> dense = dense_forward(model, prompt);
    INFO("prompt of " << length);
    REQUIRE(relative_error(logits, dense) < 1e-5);
    REQUIRE(*token == reference::argmax(dense));
  }
}

TEST_CASE("prefill reports each layer once its K/V of the whole prompt are in the cache") {
  const ReferenceModel model = make_model(1);
  const ModelShape& shape = model.shape();
  const uint32_t length = 40;
  HostKvPool pool = make_pool(shape, 6, 0xFF);
  const std::vector<uint32_t> table = shuffled_table(3, 6, 5);
  std::vector<uint32_t> saved;
  const KvLayout& layout = pool.layout();
  auto written = [&](uint32_t layer) {  // the last prompt token's V slot of KV head 1
    const uint8_t* slot = reference::kv_slot(pool.layer(layer), layout, table, length - 1, 1, KvPart::kValue);
    return !(slot[0] == 0xFF && slot[1] == 0xFF);
  };
  auto token = model.prefill(make_prompt(length, shape.vocab, 1), table, pool.view(), [&](uint32_t layer) {
    saved.push_back(layer);
    CHECK(written(layer));
    if (layer + 1 < shape.layers) CHECK_FALSE(written(layer + 1));
  });
  REQUIRE(token.ok());
  REQUIRE(saved == std::vector<uint32_t>{0, 1, 2, 3});
}

// --- disaggregation ----------------------------------------------------------------------------

TEST_CASE("a second engine decodes from copied blocks exactly as the prefill engine does") {
  const ModelShape shape = ModelShape::tiny();
  const ReferenceModel a = make_model(42);
  const uint32_t decode_steps = 16;
  for (uint32_t length : {1u, 15u, 16u, 17u, 64u, 100u}) {
    INFO("prompt of " << length << " tokens");
    const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 1000 + length);
    const uint32_t request_blocks = blocks_for(length + decode_steps, shape.block_tokens);
    const uint32_t prompt_blocks = blocks_for(length, shape.block_tokens);

    HostKvPool pool_a = make_pool(shape, 12, 0);
    const std::vector<uint32_t> table_a = shuffled_table(request_blocks, 12, length);
    std::vector<float> logits_a;
    auto first = a.prefill(prompt, table_a, pool_a.view(), {}, &logits_a);
    REQUIRE(first.ok());

    // The transfer: only the prompt's blocks, into a poisoned pool of another size, other block ids.
    HostKvPool pool_b = make_pool(shape, 20, 0xFF);
    const std::vector<uint32_t> table_b = shuffled_table(request_blocks, 20, 7 * length + 1);
    copy_blocks(pool_a, table_a, pool_b, table_b, prompt_blocks);
    HostKvPool pool_bad = make_pool(shape, 20, 0xFF);  // the same, one block corrupted
    copy_blocks(pool_a, table_a, pool_bad, table_b, prompt_blocks);
    {
      // Negate every key of the prompt's last block in layer 0: its tokens' scores change sign.
      const auto e = pool_bad.layout().extent(table_b[prompt_blocks - 1], KvPart::kKey);
      for (uint64_t i = 1; i < e.length; i += 2) pool_bad.layer(0)[e.offset + i] ^= 0x80;
    }

    const ReferenceModel b = make_model(42);  // built on its own from the same shape and seed
    uint32_t token_a = *first, token_b = *first, token_bad = *first;
    std::vector<uint32_t> tokens_a, tokens_b;
    for (uint32_t step = 0; step < decode_steps; ++step) {
      const uint32_t position = length + step;
      std::vector<float> la, lb, lbad;
      auto next_a = a.decode_step(position, token_a, table_a, pool_a.view(), &la);
      auto next_b = b.decode_step(position, token_b, table_b, pool_b.view(), &lb);
      auto next_bad = b.decode_step(position, token_bad, table_b, pool_bad.view(), &lbad);
      REQUIRE(next_a.ok());
      REQUIRE(next_b.ok());
      REQUIRE(next_bad.ok());
      REQUIRE(la == lb);  // bit for bit, not just the same argmax
      if (step == 0) {
        // The corrupted block must move the very first decode step's logits well beyond rounding.
        INFO("relative change of the logits " << relative_error(lbad, la));
        REQUIRE(relative_error(lbad, la) > 1e-3);
      }
      token_a = *next_a;
      token_b = *next_b;
      token_bad = *next_bad;
      tokens_a.push_back(token_a);
      tokens_b.push_back(token_b);
    }
    REQUIRE(tokens_a == tokens_b);
  }
}

TEST_CASE("prefill from a cached prefix equals the prefill of the whole prompt") {
  const ModelShape shape = ModelShape::tiny();
  const ReferenceModel model = make_model(5);
  for (uint32_t length : {17u, 64u, 100u}) {
    for (uint32_t start : {1u, 16u, length - 1}) {
      INFO("prompt of " << length << " tokens, prefix of " << start);
      const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 300 + length);
      const uint32_t blocks = blocks_for(length, shape.block_tokens);
      HostKvPool whole = make_pool(shape, 8, 0);
      const std::vector<uint32_t> table = shuffled_table(blocks, 8, length + start);
      std::vector<float> logits_whole;
      auto first_whole = model.prefill(prompt, table, whole.view(), {}, &logits_whole);
      REQUIRE(first_whole.ok());

      // The prefix computed on its own (as another request did before), then the rest from it.
      HostKvPool parts = make_pool(shape, 8, 0);
      const std::span<const uint32_t> all(prompt);
      REQUIRE(model.prefill(all.first(start), table, parts.view()).ok());
      std::vector<uint32_t> layers_saved;
      std::vector<float> logits_parts;
      auto first_parts = model.prefill_from(
          start, all.subspan(start), table, parts.view(), [&](uint32_t l) { layers_saved.push_back(l); },
          &logits_parts);
      REQUIRE(first_parts.ok());
      CHECK(*first_parts == *first_whole);
      CHECK(logits_parts == logits_whole);  // bit for bit
      CHECK(layers_saved.size() == shape.layers);
      for (uint32_t l = 0; l < shape.layers; ++l) {
        for (uint32_t b = 0; b < blocks; ++b) {
          for (KvPart part : {KvPart::kKey, KvPart::kValue}) {
            const auto x = whole.layout().extent(table[b], part);
            REQUIRE(std::memcmp(whole.layer(l) + x.offset, parts.layer(l) + x.offset, x.length) == 0);
          }
        }
      }
    }
  }
  HostKvPool pool = make_pool(shape, 8, 0);
  const std::vector<uint32_t> table = {0, 1};
  const Status empty = model.prefill_from(4, {}, table, pool.view()).status();
  CHECK(empty.code() == ErrorCode::kInvalidArgument);
  CHECK(empty.message().find("nothing after the prefix") != std::string::npos);
}

// --- validation --------------------------------------------------------------------------------

namespace {

void require_invalid(const Status& status, const std::string& words) {
  INFO(status.to_string());
  REQUIRE(status.code() == ErrorCode::kInvalidArgument);
  REQUIRE(status.message().find(words) != std::string::npos);
}

}  // namespace

TEST_CASE("bad input is refused with a message naming it, and nothing is written") {
  const ReferenceModel model = make_model(1);
  const ModelShape& shape = model.shape();
  HostKvPool pool = make_pool(shape, 4, 0xFF);
  const KvCacheView kv = pool.view();
  const std::vector<uint32_t> table = {2, 0, 3, 1};
  const std::vector<uint32_t> prompt = make_prompt(20, shape.vocab, 1);

  SECTION("empty prompt") {
    require_invalid(model.prefill({}, table, kv).status(), "prompt is empty");
    require_invalid(model.generate(std::vector<uint32_t>{}, 4).status(), "prompt is empty");
  }
  SECTION("token beyond the vocabulary") {
    std::vector<uint32_t> bad = prompt;
    bad[7] = shape.vocab;
    require_invalid(model.prefill(bad, table, kv).status(),
                    "token 1024 at index 7 is out of range: vocab is 1024");
    require_invalid(model.decode_step(20, 5000, table, kv).status(), "token 5000");
  }
  SECTION("block table too short for the positions") {
    require_invalid(model.prefill(prompt, std::vector<uint32_t>{2}, kv).status(), "block table too short");
    require_invalid(model.decode_step(64, 1, table, kv).status(), "position 64 needs 5 blocks");
    require_invalid(model.generate(prompt, 50, table, kv).status(), "block table too short");
  }
  SECTION("block id out of range") {
    require_invalid(model.prefill(prompt, std::vector<uint32_t>{2, 4}, kv).status(),
                    "block id 4 at block table index 1 is out of range: the KV cache has 4 blocks");
  }
  SECTION("a block twice in the table") {
    require_invalid(model.prefill(prompt, std::vector<uint32_t>{1, 1}, kv).status(),
                    "block id 1 appears more than once");
  }
  SECTION("the cache does not match the model") {
    KvCacheView fewer = kv;
    fewer.layers.pop_back();
    require_invalid(model.prefill(prompt, table, fewer).status(), "3 layer buffers, the model has 4 layers");
    KvCacheView null_layer = kv;
    null_layer.layers[2] = nullptr;
    require_invalid(model.decode_step(0, 1, table, null_layer).status(), "KV layer buffer 2 is null");
    protocol::KvLayoutDesc fp32 = shape.kv_layout_desc(4);
    fp32.dtype_bytes = 4;
    const KvCacheView wrong_dtype{KvLayout::create(fp32).value(), kv.layers};
    require_invalid(model.prefill(prompt, table, wrong_dtype).status(), "does not match the model's");
    protocol::KvLayoutDesc infer = shape.kv_layout_desc(4);
    infer.kind = protocol::KvLayoutKind::kFlashInfer;
    const KvCacheView wrong_kind{KvLayout::create(infer).value(), kv.layers};
    require_invalid(model.prefill(prompt, table, wrong_kind).status(), "flash_attention");
  }
  SECTION("nothing to generate") {
    require_invalid(model.generate(prompt, 0, table, kv).status(), "n_new is 0");
  }
  REQUIRE(all_bytes_are(pool, 0xFF));
}

TEST_CASE("invalid and oversized shapes are refused") {
  ModelShape s = ModelShape::tiny();
  s.kv_heads = 3;
  require_invalid(ReferenceModel::create(s, 1).status(), "q_heads 8 is not a multiple of kv_heads 3");
  s = ModelShape::tiny();
  s.head_dim = 33;
  require_invalid(ReferenceModel::create(s, 1).status(), "head_dim 33 is odd");
  s = ModelShape::tiny();
  s.layers = 0;
  require_invalid(ReferenceModel::create(s, 1).status(), "layers is 0");
  // Llama-3-8B is described for the GPU engine; the CPU engine refuses its 30 GiB of fp32 weights.
  REQUIRE(ModelShape::llama3_8b().validate().ok());
  REQUIRE(ModelShape::llama3_8b().parameter_count() == 8030261248ull);
  require_invalid(ReferenceModel::create(ModelShape::llama3_8b(), 1).status(),
                  "over this CPU engine's limit");
}

// --- determinism -------------------------------------------------------------------------------

TEST_CASE("the same seed gives the same tokens, another seed other tokens") {
  const std::vector<uint32_t> prompt = make_prompt(32, ModelShape::tiny().vocab, 77);
  const ReferenceModel m1 = make_model(7), m2 = make_model(7), other = make_model(8);
  auto t1 = m1.generate(prompt, 16);
  auto t2 = m2.generate(prompt, 16);
  auto t3 = other.generate(prompt, 16);
  REQUIRE(t1.ok());
  REQUIRE(t2.ok());
  REQUIRE(t3.ok());
  REQUIRE(*t1 == *t2);
  REQUIRE(*t1 != *t3);
  // The weights are integer arithmetic, a correctly rounded sqrt and one float multiply: the same
  // bits under every compiler and standard library. These values pin the generator (an independent
  // Python transcription of splitmix64 and the tensor order gave them).
  const ReferenceWeights& w = m1.weights();
  CHECK(w.embedding[0] == 0x1.c212cp-2f);
  CHECK(w.layers[0].wq[0] == 0x1.503428p-5f);
  CHECK(w.lm_head.back() == -0x1.110cdcp-5f);
}

TEST_CASE("a 100-token prefill of the tiny model takes well under a second") {
  const ReferenceModel model = make_model(1);
  HostKvPool pool = make_pool(model.shape(), 8, 0);
  const std::vector<uint32_t> table = shuffled_table(7, 8, 1);
  const auto started = std::chrono::steady_clock::now();
  auto token = model.prefill(make_prompt(100, model.shape().vocab, 1), table, pool.view());
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
  REQUIRE(token.ok());
  WARN("tiny prefill of 100 tokens: " << ms << " ms");
  REQUIRE(ms < 1000);
}
