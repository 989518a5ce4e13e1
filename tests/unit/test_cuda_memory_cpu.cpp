// The GPU data path's memory layer where there is no GPU and no RDMA device (CI): every factory
// fails with a reason instead of crashing, the CUDA IPC blob codec refuses anything malformed or
// foreign, and UCX's CUDA support is detected rather than assumed.
#include <cstdio>
#include <cstring>
#include <vector>

#include "catch.h"
#include "kvf/gpudirect/cuda_ipc_blob.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/gpudirect/ucx_context.h"
#include "kvf/gpudirect/verbs_registration.h"

using namespace kvf;
using namespace kvf::gpudirect;

namespace {

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

CudaIpcBlob sample_blob() {
  CudaIpcBlob b;
  for (size_t i = 0; i < b.ipc_handle.size(); ++i) b.ipc_handle[i] = static_cast<uint8_t>(i * 7 + 1);
  b.offset = 4096;
  b.length = 1 << 20;
  b.allocation_bytes = 8 << 20;
  b.device = 1;
  for (size_t i = 0; i < b.device_uuid.size(); ++i) b.device_uuid[i] = static_cast<uint8_t>(0xa0 + i);
  REQUIRE(stamp_cuda_ipc_origin(b).ok());
  return b;
}

}  // namespace

TEST_CASE("no GPU: CUDA memory factories fail with a reason") {
  const CudaAvailability& cuda = cuda_availability();
  std::printf("cuda: built_with_cuda=%d devices=%d reason='%s'\n", cuda.built_with_cuda, cuda.device_count,
              cuda.reason.c_str());
  if (cuda.device_count > 0) {
    WARN("this machine has a GPU; tests/gpu covers it");
    return;
  }
  REQUIRE_FALSE(cuda.reason.empty());
  auto expect_unavailable = [&](const Status& s) {
    INFO(s.to_string());
    REQUIRE(s.code() == ErrorCode::kUnavailable);
    REQUIRE(contains(s.message(), cuda.built_with_cuda ? cuda.reason : "built without CUDA"));
  };
  expect_unavailable(DeviceBuffer::allocate(0, 1 << 20).status());
  std::vector<uint8_t> host(1 << 16);
  expect_unavailable(PinnedRegistration::register_range(host.data(), host.size()).status());
  expect_unavailable(PinnedBuffer::allocate(4096).status());
  expect_unavailable(export_cuda_ipc(host.data(), host.size()).status());
  expect_unavailable(DmaBufExport::create(host.data(), host.size()).status());
  expect_unavailable(CudaStream::create(0).status());
  expect_unavailable(CudaEvent::create(0).status());
  expect_unavailable(enable_peer_access(0, 1));
  expect_unavailable(device_of(host.data()).status());
  expect_unavailable(copy_sync(host.data(), host.data() + 8, 8));
  REQUIRE_FALSE(pointer_is_device(host.data()));
  REQUIRE_FALSE(pointer_is_device(nullptr));
  std::printf("DeviceBuffer::allocate: %s\n", DeviceBuffer::allocate(0, 1).status().to_string().c_str());
}

TEST_CASE("bad arguments are refused before CUDA is asked") {
  REQUIRE(DeviceBuffer::allocate(0, 0).status().code() ==
          (cuda_availability().built_with_cuda ? ErrorCode::kInvalidArgument : ErrorCode::kUnavailable));
  if (!cuda_availability().built_with_cuda) return;
  REQUIRE(PinnedRegistration::register_range(nullptr, 64).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(export_cuda_ipc(nullptr, 64).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(event_done(nullptr).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(copy_sync(nullptr, nullptr, 0).ok());  // nothing to copy
}

TEST_CASE("CUDA IPC blob round-trips") {
  const CudaIpcBlob b = sample_blob();
  const std::vector<uint8_t> bytes = encode_cuda_ipc_blob(b);
  REQUIRE(bytes.size() == CudaIpcBlob::kEncodedBytes);
  REQUIRE(std::memcmp(bytes.data(), "KVFI", 4) == 0);
  Result<CudaIpcBlob> d = decode_cuda_ipc_blob(bytes);
  REQUIRE(d.ok());
  REQUIRE(d->ipc_handle == b.ipc_handle);
  REQUIRE(d->offset == b.offset);
  REQUIRE(d->length == b.length);
  REQUIRE(d->allocation_bytes == b.allocation_bytes);
  REQUIRE(d->device == 1);
  REQUIRE(d->device_uuid == b.device_uuid);
  REQUIRE(d->host_id == b.host_id);
  REQUIRE(d->process_id == b.process_id);
  REQUIRE(d->process_nonce == b.process_nonce);
}

TEST_CASE("CUDA IPC blob decoder refuses malformed input") {
  const std::vector<uint8_t> good = encode_cuda_ipc_blob(sample_blob());
  auto decode_error = [](const std::vector<uint8_t>& bytes) {
    Result<CudaIpcBlob> r = decode_cuda_ipc_blob(bytes);
    REQUIRE_FALSE(r.ok());
    return r.status();
  };

  SECTION("every truncation") {
    for (size_t n = 0; n < good.size(); ++n) {
      Status s = decode_error(std::vector<uint8_t>(good.begin(), good.begin() + static_cast<long>(n)));
      REQUIRE(s.code() == ErrorCode::kMalformed);
    }
  }
  SECTION("trailing bytes") {
    std::vector<uint8_t> b = good;
    b.push_back(0);
    REQUIRE(decode_error(b).code() == ErrorCode::kMalformed);
  }
  SECTION("garbage") {
    std::vector<uint8_t> b(good.size());
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 131 + 17);
    Status s = decode_error(b);
    std::printf("garbage blob: %s\n", s.to_string().c_str());
    REQUIRE(s.code() == ErrorCode::kMalformed);
    REQUIRE(contains(s.message(), "wrong magic"));
  }
  SECTION("wrong magic") {
    std::vector<uint8_t> b = good;
    b[0] = 'X';
    REQUIRE(contains(decode_error(b).message(), "wrong magic"));
  }
  SECTION("another version") {
    std::vector<uint8_t> b = good;
    b[4] = 2;
    Status s = decode_error(b);
    REQUIRE(s.code() == ErrorCode::kUnsupportedVersion);
    REQUIRE(contains(s.message(), "version 2"));
  }
  SECTION("every flipped byte is caught by the checksum or a field check") {
    for (size_t i = 0; i < good.size(); ++i) {
      std::vector<uint8_t> b = good;
      b[i] ^= 0x40;
      REQUIRE_FALSE(decode_cuda_ipc_blob(b).ok());
    }
  }
  SECTION("a range outside its allocation") {
    CudaIpcBlob b = sample_blob();
    b.offset = b.allocation_bytes - 16;
    b.length = 32;
    Status s = decode_error(encode_cuda_ipc_blob(b));
    REQUIRE(s.code() == ErrorCode::kMalformed);
    REQUIRE(contains(s.message(), "outside its allocation"));
    b.offset = ~uint64_t{0};  // offset + length would wrap
    b.length = 2;
    REQUIRE(decode_error(encode_cuda_ipc_blob(b)).code() == ErrorCode::kMalformed);
  }
  SECTION("an empty range or a negative device") {
    CudaIpcBlob b = sample_blob();
    b.length = 0;
    REQUIRE(decode_error(encode_cuda_ipc_blob(b)).code() == ErrorCode::kMalformed);
    b = sample_blob();
    b.device = -3;
    REQUIRE(contains(decode_error(encode_cuda_ipc_blob(b)).message(), "negative device"));
  }
}

TEST_CASE("CUDA IPC blobs from another host or this process are refused with the reason") {
  CudaIpcBlob b = sample_blob();
  SECTION("this process") {
    Status s = check_cuda_ipc_importable(b);
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    REQUIRE(contains(s.message(), "CUDA cannot open an IPC handle in the process that exported it"));
    if (cuda_availability().built_with_cuda) {
      // CudaIpcMapping::open says the same, before it needs a GPU.
      Result<CudaIpcMapping> m = CudaIpcMapping::open(encode_cuda_ipc_blob(b), 0);
      REQUIRE(m.status().code() == ErrorCode::kInvalidArgument);
    }
  }
  SECTION("another process of this host") {
    b.process_id += 1;
    REQUIRE(check_cuda_ipc_importable(b).ok());
    b.process_id -= 1;
    b.process_nonce ^= 1;  // same pid in another pid namespace
    REQUIRE(check_cuda_ipc_importable(b).ok());
  }
  SECTION("another host") {
    b.host_id[3] ^= 0xff;
    Status s = check_cuda_ipc_importable(b);
    std::printf("another host's blob: %s\n", s.to_string().c_str());
    REQUIRE(s.code() == ErrorCode::kUnavailable);
    REQUIRE(contains(s.message(), "another host"));
    if (cuda_availability().built_with_cuda) {
      REQUIRE(CudaIpcMapping::open(encode_cuda_ipc_blob(b), 0).status().code() == ErrorCode::kUnavailable);
    }
  }
  SECTION("garbage given to open") {
    const std::vector<uint8_t> junk = {1, 2, 3};
    Status s = CudaIpcMapping::open(junk, 0).status();
    REQUIRE(s.code() ==
            (cuda_availability().built_with_cuda ? ErrorCode::kMalformed : ErrorCode::kUnavailable));
  }
}

TEST_CASE("the host id is this boot's id") {
  Result<HostId> a = local_host_id();
  REQUIRE(a.ok());
  REQUIRE(*a != HostId{});
  REQUIRE(*local_host_id() == *a);
}

TEST_CASE("no RDMA device: VerbsDevice::open_first says so") {
  Result<VerbsDevice> d = VerbsDevice::open_first();
  if (d.ok()) {
    WARN("this machine has an RDMA device: " + d->name());
    std::vector<uint8_t> host(1 << 16);
    Result<VerbsMemoryRegion> mr = VerbsMemoryRegion::register_host(d->pd(), host.data(), host.size());
    REQUIRE(mr.ok());
    REQUIRE(mr->path() == VerbsRegistrationPath::kHost);
    return;
  }
  std::printf("VerbsDevice::open_first: %s\n", d.status().to_string().c_str());
  REQUIRE(d.status().code() == ErrorCode::kUnavailable);
  REQUIRE((contains(d.status().message(), "RDMA device") || contains(d.status().message(), "libibverbs")));
  REQUIRE(VerbsDevice::open("mlx5_0").status().code() != ErrorCode::kOk);
  int x = 0;
  REQUIRE(VerbsMemoryRegion::register_host(nullptr, &x, sizeof x).status().code() != ErrorCode::kOk);
  REQUIRE(registration_path_name(VerbsRegistrationPath::kDmaBuf) == "dma-buf");
}

TEST_CASE("UCX CUDA support is detected, not assumed") {
  auto ucx = UcxContext::create();
  REQUIRE(ucx.ok());
  const bool cuda = (*ucx)->supports_cuda_memory();
  std::printf("UcxContext::supports_cuda_memory: %d\n", cuda);
  // Debian's UCX has no cuda modules, and a UCX that has them cannot load them without a driver.
  if (cuda_availability().device_count == 0) REQUIRE_FALSE(cuda);
  if (!cuda) {
    std::vector<uint8_t> fake_device(4096);
    auto region = MemoryRegion::register_external(*ucx, fake_device.data(), fake_device.size(),
                                                  protocol::MemoryKind::kCudaDevice);
    REQUIRE_FALSE(region.ok());
    std::printf("register_external(kCudaDevice): %s\n", region.status().to_string().c_str());
    REQUIRE(region.status().code() == ErrorCode::kUnavailable);
    REQUIRE(contains(region.status().message(), "CUDA"));
  }
  // Host kinds are unchanged.
  std::vector<uint8_t> host(4096);
  auto region = MemoryRegion::register_external(*ucx, host.data(), host.size(), protocol::MemoryKind::kHost);
  REQUIRE(region.ok());
  REQUIRE(region->registered());
}
