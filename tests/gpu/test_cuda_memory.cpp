// CUDA memory on a real GPU: device buffers, pinned host memory (registered mmap and shared
// memory, and cudaHostAlloc) round trips, streams and events, CUDA IPC into a re-executed child
// process (and across GPUs when there are two), dma-buf export and verbs registration of GPU memory
// where the machine allows. Uses only the kvfabric API, so it builds without CUDA headers.
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "catch.h"
#include "kvf/gpudirect/cuda_ipc_blob.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/gpudirect/ucx_context.h"
#include "kvf/gpudirect/verbs_registration.h"

extern char** environ;

using namespace kvf;
using namespace kvf::gpudirect;

namespace {

bool have_gpu() {
  const CudaAvailability& cuda = cuda_availability();
  if (cuda.device_count > 0) return true;
  WARN("skipped: " + cuda.reason);
  return false;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// Bytes that depend on their position and a seed, so a misplaced or stale byte is caught.
uint8_t pattern_byte(uint64_t seed, uint64_t i) {
  uint64_t x = (seed + 1) * 0x9E3779B97F4A7C15ull ^ (i >> 3) * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  return static_cast<uint8_t>(x >> (8 * (i & 7)));
}

std::vector<uint8_t> pattern(uint64_t seed, uint64_t bytes) {
  std::vector<uint8_t> v(bytes);
  for (uint64_t i = 0; i < bytes; ++i) v[i] = pattern_byte(seed, i);
  return v;
}

std::string to_hex(const std::vector<uint8_t>& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : bytes) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

std::vector<uint8_t> from_hex(const std::string& s) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < s.size(); i += 2)
    out.push_back(static_cast<uint8_t>(std::stoi(s.substr(i, 2), nullptr, 16)));
  return out;
}

// CUDA cannot be used in a forked child of a process that initialized it, so the child is this
// test binary again, running only the hidden "cuda ipc child" case with its orders in the
// environment. Returns the child's exit status (0: it mapped, checked and wrote the range).
int run_ipc_child(const std::vector<uint8_t>& blob, int device, uint64_t expect_seed, uint64_t write_seed) {
  setenv("KVF_IPC_CHILD_BLOB", to_hex(blob).c_str(), 1);
  setenv("KVF_IPC_CHILD_DEVICE", std::to_string(device).c_str(), 1);
  setenv("KVF_IPC_CHILD_SEEDS", (std::to_string(expect_seed) + " " + std::to_string(write_seed)).c_str(), 1);
  char exe[4096] = {};
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  REQUIRE(n > 0);
  std::string name = "cuda ipc child";
  char* argv[] = {exe, name.data(), nullptr};
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe, nullptr, nullptr, argv, environ);
  unsetenv("KVF_IPC_CHILD_BLOB");
  unsetenv("KVF_IPC_CHILD_DEVICE");
  unsetenv("KVF_IPC_CHILD_SEEDS");
  REQUIRE(rc == 0);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

TEST_CASE("DeviceBuffer allocates, moves and frees on its device") {
  if (!have_gpu()) return;
  const int devices = cuda_availability().device_count;
  for (int d = 0; d < devices && d < 2; ++d) {
    Result<DeviceBuffer> b = DeviceBuffer::allocate(d, 3 << 20);
    REQUIRE(b.ok());
    REQUIRE(b->size() == 3u << 20);
    REQUIRE(b->device() == d);
    REQUIRE(pointer_is_device(b->data()));
    REQUIRE(*device_of(b->data()) == d);
    DeviceBuffer moved = std::move(b.value());
    REQUIRE(b->data() == nullptr);
    REQUIRE(*device_of(moved.data()) == d);
  }
  std::vector<uint8_t> host(64);
  REQUIRE_FALSE(pointer_is_device(host.data()));
  REQUIRE(device_of(host.data()).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(DeviceBuffer::allocate(devices, 64).status().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("pinned host memory round-trips through the GPU") {
  if (!have_gpu()) return;
  const uint64_t bytes = 8 << 20;
  std::mt19937_64 rng(7);
  std::vector<uint8_t> source(bytes);
  for (auto& b : source) b = static_cast<uint8_t>(rng());
  Result<DeviceBuffer> device = DeviceBuffer::allocate(0, bytes);
  REQUIRE(device.ok());
  Result<CudaStream> stream = CudaStream::create(0);
  REQUIRE(stream.ok());
  Result<CudaEvent> event = CudaEvent::create(0);
  REQUIRE(event.ok());

  auto round_trip = [&](uint8_t* in, uint8_t* out) {
    std::memcpy(in, source.data(), bytes);
    std::memset(out, 0xAB, bytes);  // poisoned: a copy that did not happen cannot pass
    REQUIRE(fill_device(device->data(), 0xCD, bytes).ok());
    REQUIRE(stream->copy_async(device->data(), in, bytes).ok());
    REQUIRE(stream->copy_async(out, device->data(), bytes).ok());
    REQUIRE(event->record(*stream).ok());
    REQUIRE(event->synchronize().ok());
    REQUIRE(*event->done());
    REQUIRE(*event_done(event->handle()));
    REQUIRE(std::memcmp(out, source.data(), bytes) == 0);
  };

  SECTION("registered mmap'd memory") {
    void* p = mmap(nullptr, 2 * bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    {
      Result<PinnedRegistration> reg = PinnedRegistration::register_range(p, 2 * bytes);
      REQUIRE(reg.ok());
      REQUIRE(reg->device_pointer() != nullptr);
      round_trip(static_cast<uint8_t*>(p), static_cast<uint8_t*>(p) + bytes);
    }
    munmap(p, 2 * bytes);
  }
  SECTION("registered POSIX shared memory (the store arena)") {
    const std::string name = "/kvf-test-pinned-" + std::to_string(getpid());
    Result<MemoryRegion> shm = MemoryRegion::create_shared(nullptr, name, 2 * bytes);
    REQUIRE(shm.ok());
    Result<PinnedRegistration> reg = PinnedRegistration::register_range(shm->data(), shm->size());
    REQUIRE(reg.ok());
    round_trip(shm->data(), shm->data() + bytes);
  }
  SECTION("cudaHostAlloc'd staging") {
    Result<PinnedBuffer> in = PinnedBuffer::allocate(bytes);
    Result<PinnedBuffer> out = PinnedBuffer::allocate(bytes);
    REQUIRE(in.ok());
    REQUIRE(out.ok());
    round_trip(static_cast<uint8_t*>(in->data()), static_cast<uint8_t*>(out->data()));
  }
}

TEST_CASE("streams wait on events; timing events measure") {
  if (!have_gpu()) return;
  Result<CudaStream> a = CudaStream::create(0);
  Result<CudaStream> b = CudaStream::create(0);
  Result<CudaEvent> start = CudaEvent::create(0, /*timing=*/true);
  Result<CudaEvent> stop = CudaEvent::create(0, /*timing=*/true);
  REQUIRE((a.ok() && b.ok() && start.ok() && stop.ok()));
  Result<DeviceBuffer> x = DeviceBuffer::allocate(0, 64 << 20);
  Result<DeviceBuffer> y = DeviceBuffer::allocate(0, 64 << 20);
  REQUIRE((x.ok() && y.ok()));
  REQUIRE(start->record(*a).ok());
  REQUIRE(a->copy_async(y->data(), x->data(), x->size()).ok());
  REQUIRE(stop->record(*a).ok());
  REQUIRE(b->wait_event(stop->handle()).ok());
  REQUIRE(b->synchronize().ok());
  REQUIRE(*stop->done());  // b waited for it
  Result<float> ms = stop->elapsed_ms_since(*start);
  REQUIRE(ms.ok());
  std::printf("64 MiB device copy: %.3f ms\n", static_cast<double>(*ms));
}

TEST_CASE("stream counters hand a buffer from one stream to another on the GPU") {
  if (!have_gpu()) return;
  Result<CudaStream> producer = CudaStream::create(0);
  Result<CudaStream> consumer = CudaStream::create(0);
  Result<CudaEvent> consumed = CudaEvent::create(0);
  Result<DeviceBuffer> counter = DeviceBuffer::allocate(0, 4096);
  Result<DeviceBuffer> slot = DeviceBuffer::allocate(0, 8 << 20);
  Result<DeviceBuffer> out = DeviceBuffer::allocate(0, 8 << 20);
  REQUIRE((producer.ok() && consumer.ok() && consumed.ok() && counter.ok() && slot.ok() && out.ok()));
  REQUIRE(fill_device(out->data(), 0xee, out->size()).ok());
  // Near the wrap: the comparison is cyclic, so 0xffffffff -> 1 counts as moving forward.
  const uint32_t start = 0xffffffffu;
  REQUIRE(copy_sync(counter->data(), &start, sizeof start).ok());
  REQUIRE(consumer->wait_value(counter->data(), 1).ok());
  REQUIRE(consumer->copy_async(out->data(), slot->data(), slot->size()).ok());
  REQUIRE(consumed->record(*consumer).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE_FALSE(*consumed->done());  // still waiting for the producer
  std::vector<uint8_t> data = pattern(17, slot->size());
  Result<PinnedBuffer> staging = PinnedBuffer::allocate(slot->size());
  REQUIRE(staging.ok());
  std::memcpy(staging->data(), data.data(), data.size());
  REQUIRE(producer->write_value(counter->data(), 0).ok());  // behind the wait's value: no release
  REQUIRE(producer->synchronize().ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE_FALSE(*consumed->done());
  REQUIRE(producer->copy_async(slot->data(), staging->data(), slot->size()).ok());
  REQUIRE(producer->write_value(counter->data(), 1).ok());  // after the copy: the slot is full
  REQUIRE(consumer->synchronize().ok());
  REQUIRE(*consumed->done());
  std::vector<uint8_t> back(out->size());
  REQUIRE(copy_sync(back.data(), out->data(), back.size()).ok());
  REQUIRE(back == data);  // the consumer saw every byte written before the counter moved
  CHECK_FALSE(consumer->wait_value(nullptr, 1).ok());
  CHECK_FALSE(producer->write_value(nullptr, 1).ok());
}

TEST_CASE("cuda ipc child", "[.]") {
  // Runs only when run_ipc_child re-executes this binary for it.
  const char* blob_hex = std::getenv("KVF_IPC_CHILD_BLOB");
  const char* device_text = std::getenv("KVF_IPC_CHILD_DEVICE");
  const char* seeds = std::getenv("KVF_IPC_CHILD_SEEDS");
  REQUIRE((blob_hex != nullptr && device_text != nullptr && seeds != nullptr));
  const int device = std::atoi(device_text);
  char* rest = nullptr;
  const uint64_t expect_seed = std::strtoull(seeds, &rest, 10);
  const uint64_t write_seed = std::strtoull(rest, nullptr, 10);
  const std::vector<uint8_t> blob = from_hex(blob_hex);
  Result<CudaIpcBlob> decoded = decode_cuda_ipc_blob(blob);
  REQUIRE(decoded.ok());

  Result<CudaIpcMapping> mapping = CudaIpcMapping::open(blob, device);
  INFO(mapping.status().to_string());
  REQUIRE(mapping.ok());
  std::printf("child %d: mapped %lu bytes of GPU %d (exporter's ordinal %d) on GPU %d\n", getpid(),
              static_cast<unsigned long>(mapping->size()), mapping->source_device(), decoded->device,
              mapping->local_device());
  REQUIRE(mapping->size() == decoded->length);
  REQUIRE(mapping->source_device() >= 0);
  std::vector<uint8_t> seen(mapping->size());
  REQUIRE(copy_sync(seen.data(), mapping->data(), seen.size()).ok());
  const std::vector<uint8_t> expected = pattern(expect_seed, seen.size());
  const bool sees_the_exporters_bytes = seen == expected;  // not REQUIRE(a == b): it prints 3 MiB
  REQUIRE(sees_the_exporters_bytes);
  const std::vector<uint8_t> mine = pattern(write_seed, mapping->size());
  REQUIRE(copy_sync(mapping->data(), mine.data(), mine.size()).ok());
}

TEST_CASE("CUDA IPC: a child process maps, reads and writes the exported range") {
  if (!have_gpu()) return;
  const int devices = cuda_availability().device_count;
  const uint64_t allocation = 6 << 20;
  const uint64_t offset = (1 << 20) + 4096 + 24;  // not at the allocation's start
  const uint64_t length = (3 << 20) + 100;
  for (int importer = 0; importer < devices && importer < 2; ++importer) {
    DYNAMIC_SECTION("exported from GPU 0, mapped on GPU " << importer) {
      if (importer != 0) REQUIRE(enable_peer_access(importer, 0).ok());
      Result<DeviceBuffer> buffer = DeviceBuffer::allocate(0, allocation);
      REQUIRE(buffer.ok());
      auto* base = static_cast<uint8_t*>(buffer->data());
      // Pattern 1 around the range, pattern 3 (from the range's first byte) inside it.
      std::vector<uint8_t> before = pattern(1, allocation);
      const std::vector<uint8_t> inside = pattern(3, length);
      std::copy(inside.begin(), inside.end(), before.begin() + offset);
      REQUIRE(copy_sync(base, before.data(), allocation).ok());

      Result<std::vector<uint8_t>> blob = export_cuda_ipc(base + offset, length);
      REQUIRE(blob.ok());
      Result<CudaIpcBlob> decoded = decode_cuda_ipc_blob(*blob);
      REQUIRE(decoded.ok());
      REQUIRE(decoded->offset == offset);
      REQUIRE(decoded->length == length);
      REQUIRE(decoded->allocation_bytes >= allocation);

      // The exporting process cannot open its own handle; it is told so plainly.
      Result<CudaIpcMapping> own = CudaIpcMapping::open(*blob, 0);
      REQUIRE_FALSE(own.ok());
      std::printf("same-process open: %s\n", own.status().to_string().c_str());
      REQUIRE(contains(own.status().message(), "process that exported it"));

      // A child told to expect other bytes fails: it really reads the mapping.
      std::printf("the next child is told to expect other bytes: its FAILED report is expected\n");
      std::fflush(stdout);
      REQUIRE(run_ipc_child(*blob, importer, 99, 2) != 0);
      // The child checks that it sees pattern 3, then writes pattern 2 over the range.
      REQUIRE(run_ipc_child(*blob, importer, 3, 2) == 0);

      std::vector<uint8_t> after(allocation);
      REQUIRE(copy_sync(after.data(), base, allocation).ok());
      const std::vector<uint8_t> written = pattern(2, length);
      REQUIRE(std::memcmp(after.data(), before.data(), offset) == 0);  // untouched below the range
      REQUIRE(std::memcmp(after.data() + offset, written.data(), length) == 0);
      REQUIRE(std::memcmp(after.data() + offset + length, before.data() + offset + length,
                          allocation - offset - length) == 0);  // and above it
    }
  }
  if (devices < 2) WARN("one GPU: the cross-GPU mapping was not exercised");
}

// CUDA reports these failures as API errors, which compute-sanitizer counts: run memcheck with
// the test spec "~[api-errors]" for a clean summary (no memory errors are hidden by that).
TEST_CASE("CUDA failures come back as Status values", "[api-errors]") {
  if (!have_gpu()) return;
  Result<DeviceBuffer> huge = DeviceBuffer::allocate(0, uint64_t{1} << 50);
  std::printf("1 PiB: %s\n", huge.status().to_string().c_str());
  REQUIRE(huge.status().code() == ErrorCode::kOutOfMemory);

  std::vector<uint8_t> host(1 << 20);
  Result<PinnedRegistration> first = PinnedRegistration::register_range(host.data(), host.size());
  REQUIRE(first.ok());
  Result<PinnedRegistration> again = PinnedRegistration::register_range(host.data() + 4096, 4096);
  std::printf("registering twice: %s\n", again.status().to_string().c_str());
  REQUIRE(again.status().code() == ErrorCode::kInvalidArgument);

  Result<CudaEvent> untimed = CudaEvent::create(0);
  Result<CudaEvent> timed = CudaEvent::create(0, /*timing=*/true);
  REQUIRE((untimed.ok() && timed.ok()));
  REQUIRE(timed->record(nullptr).ok());
  REQUIRE(untimed->record(nullptr).ok());
  REQUIRE(untimed->synchronize().ok());
  REQUIRE(untimed->elapsed_ms_since(*timed).status().code() != ErrorCode::kOk);
}

TEST_CASE("register_or_reuse uses another owner's whole registration and leaves it alone", "[api-errors]") {
  if (!have_gpu()) return;
  // UCX page-locks host memory it maps once a CUDA context is current; the staged transport's
  // slots then come back pinned already (the second sender to one receiver was once refused).
  std::vector<uint8_t> host(4 << 20);
  {
    Result<PinnedRegistration> owner = PinnedRegistration::register_range(host.data(), host.size());
    REQUIRE(owner.ok());
    REQUIRE(owner->owned());
    {
      Result<PinnedRegistration> reused = PinnedRegistration::register_or_reuse(host.data(), host.size());
      REQUIRE(reused.ok());
      CHECK_FALSE(reused->owned());
      CHECK(reused->device_pointer() == owner->device_pointer());
      CHECK(reused->size() == host.size());
    }
    // Dropping the reuse left the owner's registration in place: registering again is refused.
    CHECK(PinnedRegistration::register_range(host.data(), host.size()).status().code() ==
          ErrorCode::kInvalidArgument);
  }
  // The owner's registration is gone with it; register_or_reuse then registers (and owns) its own.
  {
    Result<PinnedRegistration> fresh = PinnedRegistration::register_or_reuse(host.data(), host.size());
    REQUIRE(fresh.ok());
    CHECK(fresh->owned());
  }
  // Pinned in part only: refused, not half-used.
  Result<PinnedRegistration> half = PinnedRegistration::register_range(host.data(), host.size() / 2);
  REQUIRE(half.ok());
  Result<PinnedRegistration> whole = PinnedRegistration::register_or_reuse(host.data(), host.size());
  std::printf("registering a half-pinned range: %s\n", whole.status().to_string().c_str());
  CHECK(whole.status().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("peer access between GPUs is idempotent", "[api-errors]") {
  if (!have_gpu()) return;
  REQUIRE(enable_peer_access(0, 0).ok());
  if (cuda_availability().device_count < 2) {
    WARN("one GPU: no peer to enable");
    return;
  }
  REQUIRE(enable_peer_access(0, 1).ok());
  REQUIRE(enable_peer_access(0, 1).ok());  // already enabled: still ok
  REQUIRE(enable_peer_access(1, 0).ok());
  REQUIRE(enable_peer_access(1, 0).ok());
}

// "[api-errors]": UCX probes each registration with driver calls that fail on ordinary cudaMalloc
// memory (cuMemRetainAllocationHandle), which compute-sanitizer counts.
TEST_CASE("UCX registers device memory when its build supports CUDA", "[api-errors]") {
  if (!have_gpu()) return;
  auto ucx = UcxContext::create();
  REQUIRE(ucx.ok());
  Result<DeviceBuffer> buffer = DeviceBuffer::allocate(0, 4 << 20);
  REQUIRE(buffer.ok());
  auto region = MemoryRegion::register_external(*ucx, buffer->data(), buffer->size(),
                                                protocol::MemoryKind::kCudaDevice);
  if (!(*ucx)->supports_cuda_memory()) {
    std::printf("this UCX has no CUDA support: %s\n", region.status().to_string().c_str());
    REQUIRE(region.status().code() == ErrorCode::kUnavailable);
    return;
  }
  INFO(region.status().to_string());
  REQUIRE(region.ok());
  REQUIRE(region->registered());
  REQUIRE(region->kind() == protocol::MemoryKind::kCudaDevice);
  REQUIRE_FALSE(region->descriptor(1).ucx_rkey.empty());
  std::printf("UCX registered 4 MiB of GPU memory (packed rkey %zu bytes)\n",
              region->descriptor(1).ucx_rkey.size());
}

TEST_CASE("dma-buf export and verbs registration of GPU memory, where the machine allows") {
  if (!have_gpu()) return;
  Result<DeviceBuffer> buffer = DeviceBuffer::allocate(0, 4 << 20);
  REQUIRE(buffer.ok());
  Result<DmaBufExport> dmabuf = DmaBufExport::create(static_cast<uint8_t*>(buffer->data()) + 100, 1 << 20);
  if (dmabuf.ok()) {
    std::printf("dma-buf: fd %d, offset %lu, %lu bytes\n", dmabuf->fd(),
                static_cast<unsigned long>(dmabuf->offset()), static_cast<unsigned long>(dmabuf->size()));
    REQUIRE(dmabuf->fd() >= 0);
    REQUIRE(dmabuf->offset() == 100);
    REQUIRE(dmabuf->size() % 4096 == 0);
  } else {
    std::printf("dma-buf export unavailable: %s\n", dmabuf.status().to_string().c_str());
    REQUIRE(dmabuf.status().code() != ErrorCode::kOk);
  }
  std::vector<uint8_t> host(64);
  REQUIRE(DmaBufExport::create(host.data(), host.size()).status().code() == ErrorCode::kInvalidArgument);

  Result<VerbsDevice> nic = VerbsDevice::open_first();
  if (!nic.ok()) {
    std::printf("verbs registration of GPU memory skipped: %s\n", nic.status().to_string().c_str());
    WARN("skipped: " + nic.status().message());
    return;
  }
  Result<VerbsMemoryRegion> mr = VerbsMemoryRegion::register_cuda(nic->pd(), buffer->data(), buffer->size());
  if (!mr.ok()) {
    std::printf("GPUDirect RDMA registration on %s failed: %s\n", nic->name().c_str(),
                mr.status().to_string().c_str());
    REQUIRE(mr.status().code() == ErrorCode::kUnavailable);
    return;
  }
  std::printf("GPUDirect RDMA on %s via %s (lkey %u rkey %u) %s\n", nic->name().c_str(),
              std::string(registration_path_name(mr->path())).c_str(), mr->lkey(), mr->rkey(),
              mr->fallback_reason().c_str());
  REQUIRE(mr->path() != VerbsRegistrationPath::kHost);
}
