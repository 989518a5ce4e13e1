// kvfabric-gpu-staged-pipeline-probe: a staged GPU0 -> GPU1 layer stream between two processes
// with no host round trip per layer (the design the cuda_ipc transport's staged puts should take).
//
// Sender: gather kernel (shuffled paged blocks -> local staging) -> copy engine into a receiver
// slot (IPC-mapped) -> cuStreamWriteValue32 "ready" into the receiver's memory. Receiver:
// cuStreamWaitValue32 on that flag -> scatter kernel (slot -> shuffled paged blocks) ->
// cuStreamWriteValue32 "freed" into the sender's memory, which the sender's copy stream waits on
// before it reuses the slot. Flags count a slot's uses, so neither side depends on when the other
// enqueued its work. Both hosts enqueue the whole request up front. Llama-3-8B shape: 32 layers x
// 512 blocks x (32 KiB K + 32 KiB V), 1 GiB. Every byte is checked after the last round.
//
// Usage: kvfabric-gpu-staged-pipeline-probe [ROUNDS] [RECEIVER_SLOTS] [LAYERS_PER_COPY]
//        [COPY_STREAMS] [IN_SLOTS] [GATHER] [SKIP] (defaults 5 4 1 1 0 0 0). Prints GB/s (1 GiB
//        over the wall time of both processes) and the blocks that differ after the last round
//        (exit 1 if any). Its anchor is kvfabric-gpu-anchors --mode peer-copy. The last three
//        arguments are the experiments of perf/RESULTS.md (session 7) on why a gather kernel slows
//        the copy engine: IN_SLOTS 1 puts the receiver's ready counters after its slots; GATHER
//        0 gather kernel, 1 none (timing only: the bytes are then wrong), 2 on 32 blocks, 3 on the
//        copy stream, 4/5 copies in two halves with the gather started at the middle/end of a copy,
//        6/7 gathers launched by the host once a copy ended; SKIP (bits, timing only) 1 the sender's
//        wait on freed, 2 the ready write and wait, 4 the receiver's freed write, 8 the receiver
//        opens no sender flags, 16 nor its slots, 32 freed counters in the receiver's memory. An
//        eighth argument COPY_API: 0 cudaMemcpyAsync, 1 cudaMemcpyBatchAsync, 2 the batch with
//        cudaMemcpyFlagPreferOverlapWithCompute.
#include <cuda.h>
#include <cuda_runtime.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "probe_util.h"
#define CU(x)                                               \
  do {                                                      \
    CUresult e = (x);                                       \
    if (e != CUDA_SUCCESS) {                                \
      const char* m;                                        \
      cuGetErrorString(e, &m);                              \
      std::fprintf(stderr, "%d %s: %s\n", __LINE__, #x, m); \
      std::exit(1);                                         \
    }                                                       \
  } while (0)
constexpr uint32_t kLayers = 32, kBlocks = 512, kExt = 32768, kPerLayer = 2 * kBlocks;  // extents a layer
constexpr size_t kLayerBytes = size_t{kPerLayer} * kExt, kTotal = kLayerBytes * kLayers;
// Paged pool: layer l, part p (K/V), block b at ((l * 2 + p) * kBlocks + b) * kExt.
__global__ void fill(uint4* pool, size_t n16, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x)
    pool[i] = make_uint4((uint32_t)i * 2654435761u ^ seed, (uint32_t)(i >> 32) + seed, (uint32_t)i + 7, seed);
}
// ext e of a layer: part e / kBlocks, block ids[e % kBlocks]; staging holds extents in order.
__global__ void gather(const char* pool, const uint32_t* ids, uint32_t layer, char* staging) {
  const uint32_t e = blockIdx.x, part = e / kBlocks;
  const uint4* s = (const uint4*)(pool + ((size_t)(layer * 2 + part) * kBlocks + ids[e % kBlocks]) * kExt);
  uint4* d = (uint4*)(staging + (size_t)e * kExt);
  for (uint32_t i = threadIdx.x; i < kExt / 16; i += blockDim.x) d[i] = s[i];
}
__global__ void gather_strided(const char* pool, const uint32_t* ids, uint32_t layer, char* staging) {
  for (uint32_t e = blockIdx.x; e < kPerLayer; e += gridDim.x) {
    const uint32_t part = e / kBlocks;
    const uint4* s = (const uint4*)(pool + ((size_t)(layer * 2 + part) * kBlocks + ids[e % kBlocks]) * kExt);
    uint4* d = (uint4*)(staging + (size_t)e * kExt);
    for (uint32_t i = threadIdx.x; i < kExt / 16; i += blockDim.x) d[i] = s[i];
  }
}
__global__ void scatter(const char* staging, const uint32_t* ids, uint32_t layer, char* pool) {
  const uint32_t e = blockIdx.x, part = e / kBlocks;
  const uint4* s = (const uint4*)(staging + (size_t)e * kExt);
  uint4* d = (uint4*)(pool + ((size_t)(layer * 2 + part) * kBlocks + ids[e % kBlocks]) * kExt);
  for (uint32_t i = threadIdx.x; i < kExt / 16; i += blockDim.x) d[i] = s[i];
}
struct Handles {
  cudaIpcMemHandle_t slots, flags;
};
int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 5;
  const uint32_t R = argc > 2 ? (uint32_t)std::atoi(argv[2]) : 4;  // receiver slots
  const uint32_t G = argc > 3 ? (uint32_t)std::atoi(argv[3]) : 1;  // layers per copy (divides 32)
  const uint32_t C = argc > 4 ? (uint32_t)std::atoi(argv[4]) : 1;  // sender copy streams (group k on k % C)
  const bool inslots = argc > 5 && std::atoi(argv[5]) != 0;  // receiver's ready counters after its slots
  const int gmode =
      argc > 6 ? std::atoi(argv[6]) : 0;  // 0 gather, 1 none, 2 on 32 blocks, 3 on the copy stream
  // timing experiments (wrong bytes): 1 sender skips its wait on freed, 2 no ready write or wait,
  // 4 receiver skips its freed write, 8 receiver does not open the sender's flags
  const int skip = argc > 7 ? std::atoi(argv[7]) : 0;
  // how the slot copy is issued: 0 cudaMemcpyAsync, 1 cudaMemcpyBatchAsync, 2 the batch with
  // cudaMemcpyFlagPreferOverlapWithCompute (asks the driver to keep the copy off the SMs)
  const int copy_api = argc > 8 ? std::atoi(argv[8]) : 0;
  const uint32_t L = 4;  // sender staging buffers
  const size_t kGroupBytes = kLayerBytes * G;
  int sv[2];
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  const pid_t pid = fork();
  const int side = pid == 0 ? 0 : 1, fd = sv[side];  // 0 sender GPU0, 1 receiver GPU1
  CK(cudaSetDevice(side));
  // Both sides know both block orders (same seeds): the sender's source blocks and the receiver's.
  std::vector<uint32_t> src_ids(kBlocks), dst_ids(kBlocks);
  std::iota(src_ids.begin(), src_ids.end(), 0);
  std::iota(dst_ids.begin(), dst_ids.end(), 0);
  std::shuffle(src_ids.begin(), src_ids.end(), std::mt19937(1));
  std::shuffle(dst_ids.begin(), dst_ids.end(), std::mt19937(2));
  uint32_t* ids;
  CK(cudaMalloc(&ids, kBlocks * 4));
  CK(cudaMemcpy(ids, side == 0 ? src_ids.data() : dst_ids.data(), kBlocks * 4, cudaMemcpyHostToDevice));
  char* pool;
  CK(cudaMalloc(&pool, kTotal));
  char* local;  // sender: L staging buffers; receiver: R slots
  CK(cudaMalloc(&local, kGroupBytes * (side == 0 ? L : R) + 4096));
  uint32_t* flags;
  if (inslots && side == 1)
    flags = (uint32_t*)(local + kGroupBytes * R);
  else
    CK(cudaMalloc(&flags, 4096));  // sender: freed[R]; receiver: ready[R]
  Handles mine, theirs;
  CK(cudaIpcGetMemHandle(&mine.slots, local));
  CK(cudaIpcGetMemHandle(&mine.flags, flags));
  xfer(fd, &mine, sizeof mine, true);
  xfer(fd, &theirs, sizeof theirs, false);
  char* peer_slots;
  uint32_t* peer_flags;
  // 16: the receiver opens nothing of the sender's; 32: freed counters live beside ready in the
  // receiver's memory (the sender waits on them over NVLink), so the receiver needs nothing of GPU0
  const bool local_freed = (skip & 32) != 0;
  if (side == 1 && (skip & 48))
    peer_slots = nullptr;
  else
    CK(cudaIpcOpenMemHandle((void**)&peer_slots, theirs.slots, cudaIpcMemLazyEnablePeerAccess));
  if (side == 1 && local_freed)
    peer_flags = flags + 512;  // its own memory
  else if (inslots && side == 0)
    peer_flags = (uint32_t*)(peer_slots + kGroupBytes * R);
  else if (side == 1 && (skip & 8))
    peer_flags = nullptr;
  else
    CK(cudaIpcOpenMemHandle((void**)&peer_flags, theirs.flags, cudaIpcMemLazyEnablePeerAccess));
  cudaStream_t work, copies[4];
  CK(cudaStreamCreateWithFlags(&work, cudaStreamNonBlocking));
  for (auto& c : copies) CK(cudaStreamCreateWithFlags(&c, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> gathered(kLayers), copied(kLayers), mid(kLayers);
  for (auto& ev : mid) CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  for (auto& ev : gathered) CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  for (auto& ev : copied) CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  if (side == 0) fill<<<1024, 256>>>((uint4*)pool, kTotal / 16, 0x1234);
  CK(cudaDeviceSynchronize());
  auto dptr = [](const void* p) { return (CUdeviceptr)(uintptr_t)p; };
  std::vector<double> gbps;
  for (int r = -1; r < rounds; ++r) {
    if (side == 1) CK(cudaMemset(pool, 0xee, kTotal));  // poison
    CK(cudaMemset(flags, 0, 4096));
    CK(cudaDeviceSynchronize());
    const double go = start_together(fd, side);
    for (uint32_t k = 0; k < kLayers / G; ++k) {  // group k: layers k*G .. k*G+G-1
      const uint32_t slot = k % R, use = k / R;
      cudaStream_t copy = copies[k % C];
      if (side == 0) {
        char* st = local + (size_t)(k % L) * kGroupBytes;
        cudaStream_t gs = gmode == 3 ? copy : work;
        if (gmode == 6 && k >= L)  // the host launches the gather once its buffer is free (not the GPU)
          while (cudaEventQuery(copied[k - L]) == cudaErrorNotReady) {
          }
        if (gmode == 7 && k >= 2)  // the host launches it once the copy before the previous one is done
          while (cudaEventQuery(copied[k - 2]) == cudaErrorNotReady) {
          }
        if (k >= L) CK(cudaStreamWaitEvent(gs, copied[k - L], 0));  // staging buffer free again
        if (gmode == 4 && k + 1 >= L && k + 1 - L < kLayers / G)
          CK(cudaStreamWaitEvent(gs, mid[k + 1 - L], 0));
        for (uint32_t j = 0; j < G; ++j) {
          if (gmode == 0 || gmode == 3 || gmode >= 4)
            gather<<<kPerLayer, 256, 0, gs>>>(pool, ids, k * G + j, st + j * kLayerBytes);
          if (gmode == 2) gather_strided<<<32, 256, 0, gs>>>(pool, ids, k * G + j, st + j * kLayerBytes);
        }
        CK(cudaEventRecord(gathered[k], gs));
        CK(cudaStreamWaitEvent(copy, gathered[k], 0));
        if (use > 0 && !(skip & 1))
          CU(cuStreamWaitValue32(copy, dptr((local_freed ? peer_flags + 512 : flags) + slot), use,
                                 CU_STREAM_WAIT_VALUE_GEQ));  // receiver freed it
        if (gmode == 4 || gmode == 5) {                       // two halves, an event between them
          CK(cudaMemcpyAsync(peer_slots + (size_t)slot * kGroupBytes, st, kGroupBytes / 2, cudaMemcpyDefault,
                             copy));
          CK(cudaEventRecord(mid[k], copy));
          CK(cudaMemcpyAsync(peer_slots + (size_t)slot * kGroupBytes + kGroupBytes / 2, st + kGroupBytes / 2,
                             kGroupBytes / 2, cudaMemcpyDefault, copy));
        } else if (copy_api == 0) {
          CK(cudaMemcpyAsync(peer_slots + (size_t)slot * kGroupBytes, st, kGroupBytes, cudaMemcpyDefault,
                             copy));
        } else {
          void* dst = peer_slots + (size_t)slot * kGroupBytes;
          const void* src = st;
          size_t bytes = kGroupBytes, attr_index = 0;
          cudaMemcpyAttributes attr{};
          attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
          if (copy_api == 2) attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
          CK(cudaMemcpyBatchAsync(&dst, &src, &bytes, 1, &attr, &attr_index, 1, copy));
        }
        if (!(skip & 2))
          CU(cuStreamWriteValue32(copy, dptr(peer_flags + slot), use + 1, CU_STREAM_WRITE_VALUE_DEFAULT));
        CK(cudaEventRecord(copied[k], copy));
      } else {
        if (!(skip & 2)) CU(cuStreamWaitValue32(work, dptr(flags + slot), use + 1, CU_STREAM_WAIT_VALUE_GEQ));
        for (uint32_t j = 0; j < G; ++j)
          scatter<<<kPerLayer, 256, 0, work>>>(local + (size_t)slot * kGroupBytes + j * kLayerBytes, ids,
                                               k * G + j, pool);
        if (!(skip & 4))
          CU(cuStreamWriteValue32(work, dptr(peer_flags + slot), use + 1, CU_STREAM_WRITE_VALUE_DEFAULT));
        CK(cudaEventRecord(copied[k], work));  // group k landed (LayerReady of its layers)
      }
    }
    CK(cudaStreamSynchronize(work));
    for (auto& c : copies) CK(cudaStreamSynchronize(c));
    double end = now(), other;
    xfer(fd, &end, sizeof end, true);
    xfer(fd, &other, sizeof other, false);
    if (r >= 0) gbps.push_back(kTotal / (std::max(end, other) - go) / 1e9);
  }
  // Verify on the receiver: its block dst_ids[j] of (layer, part) must hold the sender's block src_ids[j].
  uint64_t bad = 0;
  if (side == 0) {
    std::vector<char> h(kTotal);
    CK(cudaMemcpy(h.data(), pool, kTotal, cudaMemcpyDeviceToHost));
    xfer(fd, h.data(), kTotal, true);
  } else {
    std::vector<char> s(kTotal), d(kTotal);
    xfer(fd, s.data(), kTotal, false);
    CK(cudaMemcpy(d.data(), pool, kTotal, cudaMemcpyDeviceToHost));
    for (uint32_t l = 0; l < kLayers * 2; ++l)
      for (uint32_t j = 0; j < kBlocks; ++j)
        bad += std::memcmp(&s[((size_t)l * kBlocks + src_ids[j]) * kExt],
                           &d[((size_t)l * kBlocks + dst_ids[j]) * kExt], kExt) != 0;
    std::vector<double> v = gbps;
    std::sort(v.begin(), v.end());
    std::printf(
        "staged pipeline%s gather mode %d skip %d copy api %d, %u layer(s) a copy, %u receiver slots, %u "
        "sender buffers, "
        "%u copy stream(s): %.1f "
        "GB/s median of %d (",
        inslots ? " (ready counters after the slots)" : "", gmode, skip, copy_api, G, R, L, C,
        v[v.size() / 2], rounds);
    for (double x : gbps) std::printf(" %.1f", x);
    std::printf(" ); blocks differing after the last round: %llu of %u\n", (unsigned long long)bad,
                kLayers * 2 * kBlocks);
    waitpid(pid, nullptr, 0);
  }
  return bad != 0;
}
