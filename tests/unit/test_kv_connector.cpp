// KvConnector's request bookkeeping and its answers to misuse, without a store (every lookup
// matches nothing, saves only track state): each misuse gets its error code and a message naming
// what was wrong, and the connector keeps serving other requests afterwards. Loads and stores
// against a real kvfabricd run in integration/engine_prefix_reuse.sh.
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "catch.h"
#include "kvf/engines/kv_connector.h"

using namespace kvf;
using engines::KvConnector;

namespace {

protocol::KvLayout make_layout() {
  protocol::KvLayoutDesc d;
  d.num_layers = 3;
  d.num_blocks = 8;
  d.block_tokens = 16;
  d.kv_heads = 1;
  d.head_dim = 16;
  d.dtype_bytes = 2;
  auto layout = protocol::KvLayout::create(d);
  REQUIRE(layout.ok());
  return layout.value();
}

struct Caches {
  Caches() : view{make_layout(), {}} {
    buffers.assign(view.layout.desc().num_layers, std::vector<uint8_t>(view.layout.layer_bytes()));
    for (auto& b : buffers) view.layers.push_back(b.data());
  }
  std::vector<std::vector<uint8_t>> buffers;
  engines::KvCacheView view;
};

std::unique_ptr<KvConnector> make_connector() {
  engines::KvConnectorOptions options;
  options.model = "tiny";
  options.chunk_tokens = 32;
  auto made = KvConnector::create(options);
  REQUIRE(made.ok());
  return std::move(made.value());
}

bool mentions(const Status& s, const std::string& part) {
  return s.message().find(part) != std::string::npos;
}

const std::vector<uint32_t> kPrompt(40, 7);
const std::vector<uint32_t> kBlocks = {5, 1, 6};

// A request through a whole step: lookup, blocks, every layer saved, finished.
void run_request(KvConnector& c, engines::RequestId id) {
  auto matched = c.get_num_new_matched_tokens(id, kPrompt, 0);
  REQUIRE(matched.ok());
  CHECK(matched.value() == 0);  // no store
  REQUIRE(c.update_state_after_alloc(id, kBlocks, 0).ok());
  REQUIRE(c.start_load_kv().ok());
  for (uint32_t l = 0; l < 3; ++l) {
    REQUIRE(c.wait_for_layer_load(l).ok());
    REQUIRE(c.save_kv_layer(id, l).ok());
  }
  REQUIRE(c.wait_for_save().ok());
  auto progress = c.progress(id);
  REQUIRE(progress.ok());
  CHECK(progress->layers_saved == 3);
  auto later = c.request_finished(id);
  REQUIRE(later.ok());
  CHECK_FALSE(later.value());  // nothing pending: free the blocks now
}

}  // namespace

TEST_CASE("kv connector: calls before register_kv_caches are refused", "[kv_connector]") {
  auto c = make_connector();
  auto matched = c->get_num_new_matched_tokens(1, kPrompt, 0);
  REQUIRE_FALSE(matched.ok());
  CHECK(matched.status().code() == ErrorCode::kInvalidArgument);
  CHECK(mentions(matched.status(), "register_kv_caches"));
  CHECK(c->start_load_kv().code() == ErrorCode::kInvalidArgument);
  CHECK(c->save_kv_layer(1, 0).code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("kv connector: a request runs through a step and is forgotten", "[kv_connector]") {
  Caches caches;
  auto c = make_connector();
  REQUIRE(c->register_kv_caches(caches.view).ok());
  CHECK(c->num_layers() == 3);
  run_request(*c, 1);
  CHECK(c->progress(1).status().code() == ErrorCode::kNotFound);
  const engines::FinishedRequests finished = c->get_finished();
  CHECK(finished.sending.empty());  // freed at once, so never listed
  CHECK(c->get_block_ids_with_load_errors().empty());
}

TEST_CASE("kv connector: misuse gets a clear error and the connector keeps serving", "[kv_connector]") {
  Caches caches;
  auto c = make_connector();
  REQUIRE(c->register_kv_caches(caches.view).ok());

  SECTION("registering twice") {
    Status s = c->register_kv_caches(caches.view);
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(mentions(s, "registered already"));
  }
  SECTION("an unknown request") {
    Status s = c->save_kv_layer(99, 0);
    CHECK(s.code() == ErrorCode::kNotFound);
    CHECK(mentions(s, "request 99"));
    CHECK(c->update_state_after_alloc(99, kBlocks, 0).code() == ErrorCode::kNotFound);
    CHECK(c->wait_for_load(99).code() == ErrorCode::kNotFound);
    CHECK(c->request_finished(99).status().code() == ErrorCode::kNotFound);
    CHECK(c->abort(99).code() == ErrorCode::kNotFound);
  }
  SECTION("a layer out of range") {
    REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
    REQUIRE(c->update_state_after_alloc(2, kBlocks, 0).ok());
    Status s = c->save_kv_layer(2, 3);
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(mentions(s, "layer 3 out of range"));
    CHECK(c->wait_for_layer_load(3).code() == ErrorCode::kInvalidArgument);
    CHECK(c->progress(2)->layers_saved == 0);  // nothing changed
  }
  SECTION("a layer saved twice") {
    REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
    REQUIRE(c->update_state_after_alloc(2, kBlocks, 0).ok());
    REQUIRE(c->save_kv_layer(2, 1).ok());
    Status s = c->save_kv_layer(2, 1);
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(mentions(s, "saved already"));
    CHECK(c->progress(2)->layers_saved == 1);
  }
  SECTION("saving before the request has blocks") {
    REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
    Status s = c->save_kv_layer(2, 0);
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(mentions(s, "update_state_after_alloc"));
  }
  SECTION("more external tokens than the store matched") {
    REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
    Status s = c->update_state_after_alloc(2, kBlocks, 32);
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(mentions(s, "matched"));
  }
  SECTION("calls and waits after abort") {
    REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
    REQUIRE(c->update_state_after_alloc(2, kBlocks, 0).ok());
    REQUIRE(c->abort(2).ok());
    REQUIRE(c->abort(2).ok());  // aborting again changes nothing
    Status waited = c->wait_for_load(2);
    CHECK(waited.code() == ErrorCode::kAborted);
    CHECK(mentions(waited, "aborted"));
    CHECK(c->save_kv_layer(2, 0).code() == ErrorCode::kAborted);
    CHECK(c->get_num_new_matched_tokens(2, kPrompt, 0).status().code() == ErrorCode::kAborted);
    auto later = c->request_finished(2);  // finishing an aborted request is how it is forgotten
    REQUIRE(later.ok());
    CHECK_FALSE(later.value());
    CHECK(c->progress(2).status().code() == ErrorCode::kNotFound);
  }
  SECTION("finishing twice") {
    REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
    REQUIRE(c->request_finished(2).ok());
    CHECK(c->request_finished(2).status().code() == ErrorCode::kNotFound);
  }
  // Whatever went wrong above, another request still runs through.
  run_request(*c, 7);
}

TEST_CASE("kv connector: caches that do not match their layout are refused", "[kv_connector]") {
  Caches caches;
  auto c = make_connector();
  engines::KvCacheView short_view = caches.view;
  short_view.layers.pop_back();
  Status s = c->register_kv_caches(short_view);
  CHECK(s.code() == ErrorCode::kInvalidArgument);
  CHECK(mentions(s, "2 layer buffers for a layout of 3 layers"));
  engines::KvCacheView null_view = caches.view;
  null_view.layers[1] = nullptr;
  CHECK(mentions(c->register_kv_caches(null_view), "layer buffer 1 is null"));
  REQUIRE(c->register_kv_caches(caches.view).ok());  // the refusals registered nothing
}

namespace {

// A decode-side connector over `caches` whose block manager hands out blocks from the top down.
struct DecodeSide {
  explicit DecodeSide(Caches& caches) {
    engines::KvConnectorOptions options;
    options.model = "tiny";
    options.chunk_tokens = 32;
    options.listen = "127.0.0.1:0";
    options.allocate_blocks = [this](engines::RequestId, uint32_t n) {
      std::lock_guard lock(mutex);
      std::vector<uint32_t> out;
      for (uint32_t i = 0; i < n && next > 0; ++i) out.push_back(--next);
      return out.size() == n ? out : std::vector<uint32_t>{};
    };
    options.release_blocks = [](engines::RequestId, std::vector<uint32_t>) {};
    auto made = KvConnector::create(options);
    REQUIRE(made.ok());
    connector = std::move(made.value());
    Status registered = connector->register_kv_caches(caches.view);
    INFO(registered.to_string());
    REQUIRE(registered.ok());
    REQUIRE(connector->listen_port() != 0);
  }
  // Waits up to 10 s for the request to be listed as received.
  bool wait_received(engines::RequestId id) {
    for (int i = 0; i < 2000; ++i) {
      for (engines::RequestId r : connector->get_finished().receiving)
        if (r == id) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
  std::mutex mutex;
  uint32_t next = 8;
  std::unique_ptr<KvConnector> connector;
};

void fill_random(std::vector<uint8_t>& bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
}

}  // namespace

TEST_CASE("kv connector: PD streams a request's layers as they are saved", "[kv_connector][pd]") {
  Caches prefill_caches, decode_caches;
  // Contiguous caches: one allocation, layer l at l * layer_bytes.
  std::vector<uint8_t> prefill_memory(3 * prefill_caches.view.layout.layer_bytes());
  std::vector<uint8_t> decode_memory(3 * decode_caches.view.layout.layer_bytes(), 0xA5);
  fill_random(prefill_memory, 42);
  for (uint32_t l = 0; l < 3; ++l) {
    prefill_caches.view.layers[l] = prefill_memory.data() + l * prefill_caches.view.layout.layer_bytes();
    decode_caches.view.layers[l] = decode_memory.data() + l * decode_caches.view.layout.layer_bytes();
  }
  DecodeSide decode(decode_caches);
  auto c = make_connector();
  REQUIRE(c->register_kv_caches(prefill_caches.view).ok());
  const std::string peer = "127.0.0.1:" + std::to_string(decode.connector->listen_port());

  REQUIRE(c->get_num_new_matched_tokens(1, kPrompt, 0).ok());
  CHECK(c->send_kv_to(1, peer, {}).code() == ErrorCode::kInvalidArgument);  // no blocks yet
  REQUIRE(c->update_state_after_alloc(1, kBlocks, 0).ok());
  CHECK(c->send_kv_to(1, "no-port", {}).code() != ErrorCode::kOk);
  REQUIRE(c->send_kv_to(1, peer, {1, 2, 3}).ok());
  CHECK(c->send_kv_to(1, peer, {}).code() == ErrorCode::kInvalidArgument);  // twice
  for (uint32_t l = 0; l < 3; ++l) REQUIRE(c->save_kv_layer(1, l).ok());
  Status sent = c->wait_for_send(1);
  INFO(sent.to_string());
  REQUIRE(sent.ok());
  REQUIRE(decode.wait_received(1));
  auto kv = decode.connector->take_received(1);
  REQUIRE(kv.ok());
  CHECK(kv->context == std::vector<uint8_t>{1, 2, 3});
  REQUIRE(kv->blocks.size() == kBlocks.size());
  const protocol::KvLayout& layout = prefill_caches.view.layout;
  for (uint32_t l = 0; l < 3; ++l) {
    for (size_t i = 0; i < kBlocks.size(); ++i) {
      for (auto part : {protocol::KvPart::kKey, protocol::KvPart::kValue}) {
        const auto src = layout.extent(kBlocks[i], part);
        const auto dst = layout.extent(kv->blocks[i], part);
        REQUIRE(std::memcmp(prefill_caches.view.layers[l] + src.offset,
                            decode_caches.view.layers[l] + dst.offset, src.length) == 0);
      }
    }
  }
  CHECK(decode.connector->take_received(1).status().code() == ErrorCode::kNotFound);  // once
  auto later = c->request_finished(1);
  REQUIRE(later.ok());
  CHECK_FALSE(later.value());

  // Aborted after one layer: the stream ends there and the decode side never lists it.
  REQUIRE(c->get_num_new_matched_tokens(2, kPrompt, 0).ok());
  REQUIRE(c->update_state_after_alloc(2, kBlocks, 0).ok());
  REQUIRE(c->send_kv_to(2, peer, {}).ok());
  REQUIRE(c->save_kv_layer(2, 0).ok());
  REQUIRE(c->abort(2).ok());
  CHECK(c->wait_for_send(2).code() == ErrorCode::kAborted);
  CHECK_FALSE(decode.wait_received(2));
}

TEST_CASE("kv connector: PD refuses caches that are not one allocation", "[kv_connector][pd]") {
  Caches caches;  // three separate vectors
  auto c = make_connector();
  REQUIRE(c->register_kv_caches(caches.view).ok());
  REQUIRE(c->get_num_new_matched_tokens(1, kPrompt, 0).ok());
  REQUIRE(c->update_state_after_alloc(1, kBlocks, 0).ok());
  Status s = c->send_kv_to(1, "127.0.0.1:1", {});
  CHECK(s.code() == ErrorCode::kUnavailable);
  CHECK(mentions(s, "back to back"));
  run_request(*c, 5);  // still serving
}
