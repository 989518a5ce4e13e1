// The GPU reference engine on a real GPU, on the tiny shape and a middle one: its logits and K/V
// against the CPU reference engine's (bf16 tolerance); weights generated on the GPU equal to the
// CPU's rounded to bf16; disaggregation bit for bit (decoding from blocks copied to another cache
// under another table gives exactly generate()'s tokens); prefill from a cached prefix and small
// query tiles agree with a whole prefill; the layer callback's timing; untouched poisoned blocks;
// every validation. The Llama-3-8B case times weight generation, an 8192-token prefill and decode.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/engines/gpu_reference_model.h"
#include "kvf/engines/host_kv_pool.h"
#include "kvf/engines/reference_kernels.h"
#include "kvf/engines/reference_model.h"
#include "kvf/gpudirect/cuda_memory.h"

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

uint32_t blocks_for(uint64_t tokens, uint32_t block_tokens) {
  return static_cast<uint32_t>((tokens + block_tokens - 1) / block_tokens);
}

// Between the tiny shape and Llama-3-8B: wide enough that bf16 rounding adds up as in a real model.
ModelShape middle_shape() {
  return {4, 1024, 16, 4, 64, 2048, 4096, 16};
}

// Small workspaces: these tests hold several models and pools at once.
GpuModelOptions small_options() {
  GpuModelOptions o;
  o.max_batch_tokens = 512;
  o.max_context = 1024;
  return o;
}

std::unique_ptr<GpuReferenceModel> make_gpu_model(const ModelShape& shape, uint64_t seed,
                                                  GpuModelOptions options = small_options()) {
  auto model = GpuReferenceModel::create(shape, seed, options);
  INFO(model.status().to_string());
  REQUIRE(model.ok());
  return std::move(model.value());
}

ReferenceModel make_cpu_model(const ModelShape& shape, uint64_t seed) {
  auto model = ReferenceModel::create(shape, seed);
  INFO(model.status().to_string());
  REQUIRE(model.ok());
  return std::move(model.value());
}

// A paged KV cache in GPU memory: one allocation, layer after layer, as engines allocate it.
class DeviceKvPool {
 public:
  DeviceKvPool(const ModelShape& shape, uint32_t num_blocks, uint8_t fill)
      : layout_(KvLayout::create(shape.kv_layout_desc(num_blocks)).value()) {
    auto buffer = gpudirect::DeviceBuffer::allocate(0, layout_.layer_bytes() * shape.layers);
    INFO(buffer.status().to_string());
    REQUIRE(buffer.ok());
    buffer_ = std::move(buffer.value());
    REQUIRE(gpudirect::fill_device(buffer_.data(), fill, buffer_.size()).ok());
  }
  const KvLayout& layout() const { return layout_; }
  uint8_t* layer(uint32_t l) const {
    return static_cast<uint8_t*>(buffer_.data()) + l * layout_.layer_bytes();
  }
  KvCacheView view() const {
    KvCacheView v{layout_, {}};
    for (uint32_t l = 0; l < layout_.desc().num_layers; ++l) v.layers.push_back(layer(l));
    return v;
  }
  // Every layer, back to back.
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> host(buffer_.size());
    REQUIRE(gpudirect::copy_sync(host.data(), buffer_.data(), host.size()).ok());
    return host;
  }
  void upload(const std::vector<uint8_t>& host) {
    REQUIRE(host.size() == buffer_.size());
    REQUIRE(gpudirect::copy_sync(buffer_.data(), host.data(), host.size()).ok());
  }

 private:
  KvLayout layout_;
  gpudirect::DeviceBuffer buffer_;
};

// Copies the first `blocks` blocks of a request, K and V of every layer, from `src` under table
// `from` into `dst` under table `to` (the rest of dst unchanged): what a PD transfer does.
void copy_blocks(const DeviceKvPool& src, const std::vector<uint32_t>& from, DeviceKvPool& dst,
                 const std::vector<uint32_t>& to, uint32_t blocks) {
  const std::vector<uint8_t> s = src.download();
  std::vector<uint8_t> d = dst.download();
  const uint64_t src_layer = src.layout().layer_bytes(), dst_layer = dst.layout().layer_bytes();
  for (uint32_t l = 0; l < src.layout().desc().num_layers; ++l) {
    for (uint32_t i = 0; i < blocks; ++i) {
      for (KvPart part : {KvPart::kKey, KvPart::kValue}) {
        const auto a = src.layout().extent(from[i], part);
        const auto b = dst.layout().extent(to[i], part);
        REQUIRE(a.length == b.length);
        std::memcpy(d.data() + l * dst_layer + b.offset, s.data() + l * src_layer + a.offset, a.length);
      }
    }
  }
  dst.upload(d);
}

// Position `position`'s K or V (kv_heads * head_dim values) of one layer in a downloaded pool image.
std::vector<float> kv_row(const std::vector<uint8_t>& image, const KvLayout& layout, uint32_t layer,
                          const std::vector<uint32_t>& table, uint32_t position, KvPart part) {
  const auto& d = layout.desc();
  const uint8_t* slot =
      reference::kv_slot(image.data() + layer * layout.layer_bytes(), layout, table, position, 0, part);
  std::vector<float> out(uint64_t{d.kv_heads} * d.head_dim);
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t bits = 0;
    std::memcpy(&bits, slot + 2 * i, 2);
    out[i] = reference::from_bf16(bits);
  }
  return out;
}

struct Agreement {
  double max_diff = 0;  // max |a - b|
  double max_ref = 0;   // max |b|
  double rel_l2 = 0;    // |a - b| / |b|
};

Agreement compare(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  Agreement r;
  double diff2 = 0, ref2 = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    r.max_diff = std::max(r.max_diff, std::fabs(d));
    r.max_ref = std::max(r.max_ref, std::fabs(static_cast<double>(b[i])));
    diff2 += d * d;
    ref2 += static_cast<double>(b[i]) * b[i];
  }
  r.rel_l2 = ref2 == 0 ? std::sqrt(diff2) : std::sqrt(diff2 / ref2);
  return r;
}

// The gap between the largest logit and the runner-up: when it is wider than the difference
// between two computations' logits, both must pick the same token.
double top_margin(const std::vector<float>& logits) {
  std::vector<float> sorted = logits;
  std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
  return static_cast<double>(sorted[0]) - sorted[1];
}

void require_same_token_unless_tied(uint32_t a, uint32_t b, const std::vector<float>& logits_a,
                                    const std::vector<float>& logits_b) {
  const Agreement g = compare(logits_a, logits_b);
  INFO("tokens " << a << " and " << b << ", top-2 margin " << top_margin(logits_b)
                 << ", max logit difference " << g.max_diff);
  if (top_margin(logits_b) > 2 * g.max_diff) REQUIRE(a == b);
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

}  // namespace

// --- against the CPU engine ----------------------------------------------------------------------

TEST_CASE("GPU prefill agrees with the CPU reference engine within bf16 tolerance", "[gpu]") {
  for (const ModelShape& shape : {ModelShape::tiny(), middle_shape()}) {
    const ReferenceModel cpu = make_cpu_model(shape, 5);
    auto gpu = GpuReferenceModel::create_from(shape, cpu.weights(), small_options());
    INFO(gpu.status().to_string());
    REQUIRE(gpu.ok());
    for (uint32_t length : {1u, 17u, 100u}) {
      INFO("shape " << shape.to_string() << ", prompt of " << length);
      const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 500 + length);
      const std::vector<uint32_t> table = shuffled_table(blocks_for(length, shape.block_tokens), 12, length);
      auto host = HostKvPool::create(shape.kv_layout_desc(12), 0xFF);
      REQUIRE(host.ok());
      DeviceKvPool dev(shape, 12, 0xFF);
      std::vector<float> cpu_logits, gpu_logits;
      auto cpu_token = cpu.prefill(prompt, table, host->view(), {}, &cpu_logits);
      auto gpu_token = gpu.value()->prefill(prompt, table, dev.view(), {}, &gpu_logits);
      REQUIRE(cpu_token.ok());
      INFO(gpu_token.status().to_string());
      REQUIRE(gpu_token.ok());
      REQUIRE(gpu_logits.size() == shape.vocab);
      REQUIRE(all_finite(gpu_logits));
      const Agreement logits = compare(gpu_logits, cpu_logits);
      WARN(shape.to_string() << ", " << length << " tokens: logits max |diff| " << logits.max_diff
                             << " (max |cpu| " << logits.max_ref << "), relative L2 " << logits.rel_l2);
      CHECK(logits.max_diff <= 0.05 * logits.max_ref);
      CHECK(logits.rel_l2 <= 0.02);
      require_same_token_unless_tied(*gpu_token, *cpu_token, gpu_logits, cpu_logits);

      // The K/V the GPU wrote, layer by layer, against the CPU's.
      const std::vector<uint8_t> image = dev.download();
      for (uint32_t l = 0; l < shape.layers; ++l) {
        for (KvPart part : {KvPart::kKey, KvPart::kValue}) {
          std::vector<float> g, c;
          for (uint32_t p = 0; p < length; ++p) {
            const std::vector<float> gr = kv_row(image, dev.layout(), l, table, p, part);
            const uint8_t* slot = reference::kv_slot(host->layer(l), host->layout(), table, p, 0, part);
            g.insert(g.end(), gr.begin(), gr.end());
            for (size_t i = 0; i < gr.size(); ++i) {
              uint16_t bits = 0;
              std::memcpy(&bits, slot + 2 * i, 2);
              c.push_back(reference::from_bf16(bits));
            }
          }
          const Agreement kv = compare(g, c);
          INFO("layer " << l << (part == KvPart::kKey ? " K" : " V") << ": max |diff| " << kv.max_diff
                        << " (max |cpu| " << kv.max_ref << "), relative L2 " << kv.rel_l2);
          CHECK(kv.max_diff <= 0.05 * kv.max_ref);
          CHECK(kv.rel_l2 <= 0.02);
        }
      }
    }
  }
}

TEST_CASE("create() draws on the GPU the weights create_from uploads from the CPU generator", "[gpu]") {
  for (const ModelShape& shape : {ModelShape::tiny(), middle_shape()}) {
    INFO(shape.to_string());
    const auto generated = make_gpu_model(shape, 9);
    auto uploaded =
        GpuReferenceModel::create_from(shape, ReferenceWeights::generate(shape, 9), small_options());
    REQUIRE(uploaded.ok());
    const std::vector<uint32_t> prompt = make_prompt(40, shape.vocab, 3);
    const std::vector<uint32_t> table = {3, 1, 0};
    DeviceKvPool a(shape, 4, 0xFF), b(shape, 4, 0xFF);
    std::vector<float> la, lb;
    auto ta = generated->prefill(prompt, table, a.view(), {}, &la);
    auto tb = uploaded.value()->prefill(prompt, table, b.view(), {}, &lb);
    REQUIRE(ta.ok());
    REQUIRE(tb.ok());
    REQUIRE(*ta == *tb);
    REQUIRE(la == lb);  // bit for bit: the same weights, the same computation
    const bool same_kv = a.download() == b.download();
    REQUIRE(same_kv);
  }
}

TEST_CASE("prefill reports each layer once its K/V writes are enqueued, before its attention", "[gpu]") {
  const ModelShape shape = ModelShape::tiny();
  const auto model = make_gpu_model(shape, 1);
  const uint32_t length = 40;
  DeviceKvPool pool(shape, 6, 0xFF);
  const std::vector<uint32_t> table = shuffled_table(3, 6, 5);
  // The last prompt token's V slot of KV head 1 in `layer`, read from the GPU.
  auto written = [&](uint32_t layer) {
    const uint8_t* slot =
        reference::kv_slot(pool.layer(layer), pool.layout(), table, length - 1, 1, KvPart::kValue);
    uint8_t bytes[2] = {0xFF, 0xFF};
    REQUIRE(gpudirect::copy_sync(bytes, slot, 2).ok());
    return !(bytes[0] == 0xFF && bytes[1] == 0xFF);
  };
  std::vector<uint32_t> saved;
  auto token = model->prefill(
      make_prompt(length, shape.vocab, 1), table, pool.view(), [&](uint32_t layer, void* stream) {
        saved.push_back(layer);
        CHECK(stream == model->stream());
        // What the connector would do with an event, done here by waiting for the stream.
        REQUIRE(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)) == cudaSuccess);
        CHECK(written(layer));
        if (layer + 1 < shape.layers) CHECK_FALSE(written(layer + 1));
      });
  REQUIRE(token.ok());
  REQUIRE(saved == std::vector<uint32_t>{0, 1, 2, 3});
}

// --- disaggregation ------------------------------------------------------------------------------

TEST_CASE("a decode from blocks copied to another cache gives exactly generate()'s tokens", "[gpu]") {
  const uint32_t n_new = 8;
  for (const ModelShape& shape : {ModelShape::tiny(), middle_shape()}) {
    const auto model = make_gpu_model(shape, 42);
    // Multiples of the block (16) and of the store's chunk (256), and lengths beside them.
    for (uint32_t length : {1u, 15u, 16u, 17u, 100u, 255u, 256u, 257u, 300u}) {
      INFO(shape.to_string() << ", prompt of " << length << " tokens");
      const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 1000 + length);
      const uint32_t request_blocks = blocks_for(length + n_new - 1, shape.block_tokens);
      const uint32_t prompt_blocks = blocks_for(length, shape.block_tokens);
      const std::vector<uint32_t> table_a = shuffled_table(request_blocks, 24, length);

      DeviceKvPool pool_gen(shape, 24, 0);
      auto generated = model->generate(prompt, n_new, table_a, pool_gen.view());
      INFO(generated.status().to_string());
      REQUIRE(generated.ok());
      REQUIRE(generated->size() == n_new);

      // The prefill engine's side, then the transfer: only the prompt's blocks, into a poisoned
      // cache of another size under other block ids.
      DeviceKvPool pool_a(shape, 24, 0);
      std::vector<float> prefill_logits;
      auto first = model->prefill(prompt, table_a, pool_a.view(), {}, &prefill_logits);
      REQUIRE(first.ok());
      REQUIRE(*first == generated->front());
      DeviceKvPool pool_b(shape, 40, 0xFF);
      const std::vector<uint32_t> table_b = shuffled_table(request_blocks, 40, 7 * length + 1);
      copy_blocks(pool_a, table_a, pool_b, table_b, prompt_blocks);

      // Decode steps at positions length, length + 1, ... on both caches: the same bits.
      std::vector<uint32_t> tokens{*first};
      for (uint32_t i = 1; i < n_new; ++i) {
        const uint32_t position = length + i - 1;
        std::vector<float> la, lb;
        auto next_a = model->decode_step(position, tokens.back(), table_a, pool_a.view(), &la);
        auto next_b = model->decode_step(position, tokens.back(), table_b, pool_b.view(), &lb);
        REQUIRE(next_a.ok());
        REQUIRE(next_b.ok());
        REQUIRE(la == lb);
        REQUIRE(*next_a == *next_b);
        tokens.push_back(*next_b);
      }
      REQUIRE(tokens == *generated);

      // kvfabric-engine's decode starts again at the prompt's last position (rewriting its K/V).
      // On the GPU that step's GEMMs have one row, the prefill's had `length`: cuBLAS may sum in
      // another order, so the logits agree to rounding, not bit for bit.
      DeviceKvPool pool_c(shape, 40, 0xFF);
      copy_blocks(pool_a, table_a, pool_c, table_b, prompt_blocks);
      std::vector<float> again_logits;
      auto again = model->decode_step(length - 1, prompt.back(), table_b, pool_c.view(), &again_logits);
      REQUIRE(again.ok());
      const Agreement g = compare(again_logits, prefill_logits);
      INFO("last position recomputed: max |diff| " << g.max_diff << " of max " << g.max_ref);
      CHECK(g.max_diff <= 0.01 * g.max_ref);
      require_same_token_unless_tied(*again, *first, again_logits, prefill_logits);
    }
  }
}

TEST_CASE("prefill from a cached prefix agrees with the prefill of the whole prompt", "[gpu]") {
  for (const ModelShape& shape : {ModelShape::tiny(), middle_shape()}) {
    const auto model = make_gpu_model(shape, 5);
    for (uint32_t length : {17u, 100u, 300u}) {
      for (uint32_t start : {1u, 16u, length - 1}) {
        INFO(shape.to_string() << ", prompt of " << length << " tokens, prefix of " << start);
        const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 300 + length);
        const uint32_t blocks = blocks_for(length, shape.block_tokens);
        const std::vector<uint32_t> table = shuffled_table(blocks, 24, length + start);
        DeviceKvPool whole(shape, 24, 0);
        std::vector<float> logits_whole;
        auto first_whole = model->prefill(prompt, table, whole.view(), {}, &logits_whole);
        REQUIRE(first_whole.ok());

        // The prefix computed on its own (as another request did before), then the rest from it.
        DeviceKvPool parts(shape, 24, 0);
        const std::span<const uint32_t> all(prompt);
        REQUIRE(model->prefill(all.first(start), table, parts.view()).ok());
        std::vector<uint32_t> layers_saved;
        std::vector<float> logits_parts;
        auto first_parts = model->prefill_from(
            start, all.subspan(start), table, parts.view(),
            [&](uint32_t l, void*) { layers_saved.push_back(l); }, &logits_parts);
        REQUIRE(first_parts.ok());
        CHECK(layers_saved.size() == shape.layers);
        // Not bit for bit: the prefix's K/V came from GEMMs of `start` rows, the whole prompt's
        // from GEMMs of `length` rows, and cuBLAS may pick another algorithm (summation order)
        // for another row count. The same up to rounding.
        const Agreement g = compare(logits_parts, logits_whole);
        INFO("max |diff| " << g.max_diff << " of max " << g.max_ref << ", relative L2 " << g.rel_l2);
        CHECK(g.max_diff <= 0.01 * g.max_ref);
        CHECK(g.rel_l2 <= 0.005);
        require_same_token_unless_tied(*first_parts, *first_whole, logits_parts, logits_whole);
      }
    }
  }
}

TEST_CASE("attention in small query tiles agrees with one tile", "[gpu]") {
  const ModelShape shape = middle_shape();
  GpuModelOptions tiles = small_options();
  tiles.attention_score_bytes = 1;  // the minimum: one row at max_context, a few rows of these prompts
  const auto one_tile = make_gpu_model(shape, 3);
  const auto many_tiles = make_gpu_model(shape, 3, tiles);
  for (uint32_t length : {2u, 100u, 300u}) {
    INFO("prompt of " << length);
    const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 77 + length);
    const std::vector<uint32_t> table = shuffled_table(blocks_for(length, shape.block_tokens), 20, length);
    DeviceKvPool a(shape, 20, 0xFF), b(shape, 20, 0xFF);
    std::vector<float> la, lb;
    auto ta = one_tile->prefill(prompt, table, a.view(), {}, &la);
    auto tb = many_tiles->prefill(prompt, table, b.view(), {}, &lb);
    REQUIRE(ta.ok());
    REQUIRE(tb.ok());
    const Agreement g = compare(lb, la);
    INFO("max |diff| " << g.max_diff << " of max " << g.max_ref);
    CHECK(g.max_diff <= 0.01 * g.max_ref);
    require_same_token_unless_tied(*tb, *ta, lb, la);
  }
}

// --- what is written, what is refused ---------------------------------------------------------------

TEST_CASE("prefill writes only its positions' slots: the rest of a poisoned cache stays poisoned", "[gpu]") {
  const ModelShape shape = ModelShape::tiny();
  const auto model = make_gpu_model(shape, 1);
  const uint32_t length = 100;  // 7 blocks, the last one holding 4 positions of 16
  DeviceKvPool pool(shape, 30, 0xFF);
  const std::vector<uint32_t> table = shuffled_table(blocks_for(length, shape.block_tokens), 30, 2);
  REQUIRE(model->prefill(make_prompt(length, shape.vocab, 2), table, pool.view()).ok());
  const std::vector<uint8_t> image = pool.download();
  const KvLayout& layout = pool.layout();
  const uint64_t row_bytes = uint64_t{shape.kv_heads} * shape.head_dim * 2;
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (uint32_t block = 0; block < 30; ++block) {
      const auto used = std::find(table.begin(), table.end(), block);
      for (KvPart part : {KvPart::kKey, KvPart::kValue}) {
        const auto e = layout.extent(block, part);
        const uint8_t* p = image.data() + l * layout.layer_bytes() + e.offset;
        // Positions this block holds for the request: a full block, part of the last one, or none.
        const uint64_t first = used == table.end() ? 0 : uint64_t(used - table.begin()) * shape.block_tokens;
        const uint64_t held =
            used == table.end() ? 0 : std::min<uint64_t>(shape.block_tokens, length - first);
        INFO("layer " << l << ", block " << block << (part == KvPart::kKey ? " K" : " V") << ", " << held
                      << " positions of the request");
        REQUIRE(std::all_of(p + held * row_bytes, p + e.length, [](uint8_t b) { return b == 0xFF; }));
        if (held > 0)
          REQUIRE_FALSE(std::all_of(p, p + held * row_bytes, [](uint8_t b) { return b == 0xFF; }));
      }
    }
  }
}

namespace {

void require_invalid(const Status& status, const std::string& words) {
  INFO(status.to_string());
  REQUIRE(status.code() == ErrorCode::kInvalidArgument);
  REQUIRE(status.message().find(words) != std::string::npos);
}

}  // namespace

TEST_CASE("bad input is refused with a message naming it, nothing is written, and the model still works",
          "[gpu]") {
  const ModelShape shape = ModelShape::tiny();
  GpuModelOptions options = small_options();
  options.max_batch_tokens = 32;
  const auto model = make_gpu_model(shape, 1, options);
  const std::vector<uint32_t> table = {2, 0, 3, 1};
  const std::vector<uint32_t> prompt = make_prompt(20, shape.vocab, 1);

  DeviceKvPool good(shape, 4, 0xFF);
  std::vector<float> good_logits;
  auto good_token = model->prefill(prompt, table, good.view(), {}, &good_logits);
  REQUIRE(good_token.ok());

  DeviceKvPool pool(shape, 4, 0xFF);
  const KvCacheView kv = pool.view();
  {
    std::vector<uint32_t> bad = prompt;
    bad[7] = shape.vocab;
    require_invalid(model->prefill(bad, table, kv).status(),
                    "token 1024 at index 7 is out of range: vocab is 1024");
    require_invalid(model->decode_step(20, 5000, table, kv).status(), "token 5000");
  }
  require_invalid(model->prefill(prompt, std::vector<uint32_t>{2}, kv).status(), "block table too short");
  require_invalid(model->decode_step(40, 1, std::vector<uint32_t>{2, 0}, kv).status(),
                  "position 40 needs 3 blocks");
  require_invalid(model->generate(prompt, 50, table, kv).status(), "block table too short");
  require_invalid(model->prefill(prompt, std::vector<uint32_t>{2, 4}, kv).status(),
                  "block id 4 at block table index 1 is out of range: the KV cache has 4 blocks");
  require_invalid(model->prefill(prompt, std::vector<uint32_t>{1, 1}, kv).status(),
                  "block id 1 appears more than once");
  {
    std::vector<uint8_t> host_layer(pool.layout().layer_bytes());
    KvCacheView host = kv;
    host.layers[0] = host_layer.data();
    require_invalid(model->prefill(prompt, table, host).status(),
                    "KV layer buffer 0 is not device memory of GPU 0");
    KvCacheView odd = kv;
    odd.layers[1] += 1;
    require_invalid(model->prefill(prompt, table, odd).status(), "KV layer buffer 1 is not 2-byte aligned");
    KvCacheView past = kv;
    past.layers[3] += 2;  // the last layer of the allocation, shifted: its end runs past it
    require_invalid(model->prefill(prompt, table, past).status(), "KV layer buffer 3: its");
    KvCacheView fewer = kv;
    fewer.layers.pop_back();
    require_invalid(model->prefill(prompt, table, fewer).status(), "3 layer buffers, the model has 4 layers");
    KvCacheView null_layer = kv;
    null_layer.layers[2] = nullptr;
    require_invalid(model->decode_step(0, 1, table, null_layer).status(), "KV layer buffer 2 is null");
    protocol::KvLayoutDesc infer = shape.kv_layout_desc(4);
    infer.kind = protocol::KvLayoutKind::kFlashInfer;
    const KvCacheView wrong_kind{KvLayout::create(infer).value(), kv.layers};
    require_invalid(model->prefill(prompt, table, wrong_kind).status(), "flash_attention");
  }
  require_invalid(model->prefill(make_prompt(40, shape.vocab, 1), table, kv).status(),
                  "40 positions in one call are over this model's max_batch_tokens of 32");
  require_invalid(model->decode_step(1024, 1, table, kv).status(), "beyond this model's max_context of 1024");
  require_invalid(model->prefill({}, table, kv).status(), "prompt is empty");
  require_invalid(model->prefill_from(4, {}, table, kv).status(), "nothing after the prefix");
  require_invalid(model->generate(prompt, 0, table, kv).status(), "n_new is 0");

  // Nothing was written, and the model computes as before.
  const std::vector<uint8_t> image = pool.download();
  REQUIRE(std::all_of(image.begin(), image.end(), [](uint8_t b) { return b == 0xFF; }));
  std::vector<float> logits;
  auto token = model->prefill(prompt, table, kv, {}, &logits);
  REQUIRE(token.ok());
  REQUIRE(*token == *good_token);
  REQUIRE(logits == good_logits);

  GpuModelOptions zero = small_options();
  zero.max_batch_tokens = 0;
  require_invalid(GpuReferenceModel::create(shape, 1, zero).status(), "max_batch_tokens is 0");
  GpuModelOptions absent = small_options();
  absent.device = 4096;
  require_invalid(GpuReferenceModel::create(shape, 1, absent).status(), "CUDA device 4096 does not exist");
  ModelShape odd = shape;
  odd.head_dim = 33;
  require_invalid(GpuReferenceModel::create(odd, 1, small_options()).status(), "head_dim 33 is odd");
}

// --- Llama-3-8B ------------------------------------------------------------------------------------

TEST_CASE("Llama-3-8B: weights in well under seconds, an 8192-token prefill in under a second",
          "[gpu][perf]") {
  size_t free_bytes = 0, total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  if (free_bytes < (uint64_t{40} << 30)) {
    WARN("skipped: " << (free_bytes >> 30) << " GiB free on GPU 0, the 8B shape wants about 40");
    return;
  }
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  const ModelShape shape = ModelShape::llama3_8b();
  const uint32_t length = 8192, decode_steps = 16;
  GpuModelOptions options;
  options.max_batch_tokens = length;
  options.max_context = length + decode_steps;
  auto started = Clock::now();
  const auto model = make_gpu_model(shape, 1, options);
  const double create_ms = ms_since(started);

  const uint32_t blocks = blocks_for(length + decode_steps, shape.block_tokens);
  DeviceKvPool pool(shape, blocks, 0);
  std::vector<uint32_t> table(blocks);
  for (uint32_t b = 0; b < blocks; ++b) table[b] = blocks - 1 - b;
  const std::vector<uint32_t> prompt = make_prompt(length, shape.vocab, 8);
  // A short prefill first: cuBLAS loads its kernels on first use.
  REQUIRE(model->prefill(std::span<const uint32_t>(prompt).first(64), table, pool.view()).ok());

  started = Clock::now();
  std::vector<float> logits;
  auto first = model->prefill(prompt, table, pool.view(), {}, &logits);
  const double prefill_ms = ms_since(started);
  INFO(first.status().to_string());
  REQUIRE(first.ok());
  REQUIRE(all_finite(logits));
  std::vector<uint32_t> tokens{*first};
  started = Clock::now();
  for (uint32_t i = 0; i < decode_steps; ++i) {
    auto next = model->decode_step(length + i, tokens.back(), table, pool.view());
    REQUIRE(next.ok());
    tokens.push_back(*next);
  }
  const double decode_ms = ms_since(started) / decode_steps;
  WARN("Llama-3-8B: create " << create_ms << " ms (" << (model->device_bytes() >> 20)
                             << " MiB on the GPU), prefill of " << length << " tokens " << prefill_ms
                             << " ms, decode " << decode_ms << " ms per token");
  CHECK(create_ms < 5000);
  CHECK(prefill_ms < 1000);
  CHECK(decode_ms < 50);
}
