// StoreConnector::create's choice between the host path and the GPU path, where it can be checked
// without a daemon (create does not connect): host buffers take the host path whether declared or
// detected; buffers declared GPU memory are refused with the reason where CUDA or a GPU is missing
// (kUnavailable, never touched as host memory), and as host memory on a GPU machine
// (kInvalidArgument); a layer count that does not match the layout is refused. The copies
// themselves run against a real kvfabricd in integration/store_connector.sh (host) and
// gpu/store_connector_cuda.sh (GPU).
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/engines/store_connector.h"
#include "kvf/gpudirect/cuda_probe.h"

using namespace kvf;

namespace {

protocol::KvLayoutDesc small_layout() {
  protocol::KvLayoutDesc d;
  d.kind = protocol::KvLayoutKind::kFlashAttention;
  d.num_layers = 2;
  d.num_blocks = 8;
  d.block_tokens = 16;
  d.kv_heads = 1;
  d.head_dim = 32;
  d.dtype_bytes = 2;
  return d;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

struct HostPool {
  explicit HostPool(const protocol::KvLayoutDesc& d) {
    auto layout = protocol::KvLayout::create(d);
    REQUIRE(layout.ok());
    buffers.assign(d.num_layers, std::vector<uint8_t>(layout->layer_bytes()));
    for (auto& b : buffers) layers.push_back(b.data());
  }
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<uint8_t*> layers;
};

}  // namespace

TEST_CASE("host layer buffers take the host path, declared or detected", "[store_connector]") {
  store::StoreClient client(store::StoreClientOptions{"/nonexistent/kvf-test.sock", "unit"});
  HostPool pool(small_layout());
  for (auto memory : {engines::LayerMemory::kAuto, engines::LayerMemory::kHost}) {
    engines::StoreConnectorOptions options{"m", small_layout(), 64};
    options.memory = memory;
    auto connector = engines::StoreConnector::create(client, options, pool.layers);
    REQUIRE(connector.ok());
    CHECK(connector->device() == -1);
    CHECK(connector->blocks_per_chunk() == 4);
    // Lookups need the daemon: with none, an error value, not a hang or a crash.
    const std::vector<uint32_t> tokens(128, 7);
    auto held = connector->lookup(tokens);
    REQUIRE_FALSE(held.ok());
    CHECK(held.status().code() == ErrorCode::kUnavailable);
  }
}

TEST_CASE("buffers declared GPU memory are refused with the reason, never used as host memory",
          "[store_connector]") {
  store::StoreClient client(store::StoreClientOptions{"/nonexistent/kvf-test.sock", "unit"});
  HostPool pool(small_layout());
  engines::StoreConnectorOptions options{"m", small_layout(), 64};
  options.memory = engines::LayerMemory::kCuda;
  auto connector = engines::StoreConnector::create(client, options, pool.layers);
  REQUIRE_FALSE(connector.ok());
  INFO(connector.status().to_string());
  if (gpudirect::cuda_availability().device_count == 0) {
    // CI: no CUDA in the build, or no GPU on the machine.
    CHECK(connector.status().code() == ErrorCode::kUnavailable);
    CHECK(contains(connector.status().message(), "CUDA is not available"));
  } else {
    // A GPU machine: these are host buffers, which CUDA reports as such.
    CHECK(connector.status().code() == ErrorCode::kInvalidArgument);
    CHECK(contains(connector.status().message(), "layer buffer 0 was declared GPU memory"));
  }
}

TEST_CASE("a layer count that does not match the layout is refused", "[store_connector]") {
  store::StoreClient client(store::StoreClientOptions{"/nonexistent/kvf-test.sock", "unit"});
  HostPool pool(small_layout());
  pool.layers.pop_back();
  auto connector = engines::StoreConnector::create(client, {"m", small_layout(), 64}, pool.layers);
  REQUIRE_FALSE(connector.ok());
  CHECK(connector.status().code() == ErrorCode::kInvalidArgument);
}
