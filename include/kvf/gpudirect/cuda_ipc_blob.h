// CudaIpcBlob: the self-describing bytes that carry a CUDA IPC memory handle to another process
// (export_cuda_ipc / CudaIpcMapping::open in cuda_memory.h). Besides the 64-byte handle it names
// where the exported range lies inside its allocation, the GPU (ordinal and UUID), the host (its
// boot id) and the exporting process, so an importer refuses with a clear reason what CUDA would
// refuse with a cryptic one: a blob from another host, or one opened in the process that exported
// it (CUDA never opens its own process's IPC handles). Host-only code: it builds and is tested
// without CUDA. Plain values and pure functions; local_host_id() is computed once, thread-safe.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

using HostId = std::array<uint8_t, 16>;
using DeviceUuid = std::array<uint8_t, 16>;

// Layout (little-endian), 148 bytes:
//   magic "KVFI" | version u16 | size u16 | device i32 | exporter pid u32 | offset u64 |
//   length u64 | allocation bytes u64 | device uuid [16] | host id [16] | process nonce u64 |
//   cudaIpcMemHandle [64] | checksum u32 = XXH32(all bytes before it, seed 0)
struct CudaIpcBlob {
  static constexpr uint32_t kMagic = 0x4946564Bu;  // "KVFI" read as little-endian u32
  static constexpr uint16_t kVersion = 1;
  static constexpr size_t kHandleBytes = 64;  // CUDA_IPC_HANDLE_SIZE
  static constexpr size_t kEncodedBytes = 148;

  std::array<uint8_t, kHandleBytes> ipc_handle{};  // cudaIpcMemHandle_t of the whole allocation
  uint64_t offset = 0;                             // of the exported range inside the allocation
  uint64_t length = 0;                             // of the exported range
  uint64_t allocation_bytes = 0;                   // offset + length <= allocation_bytes
  int32_t device = -1;       // the exporter's ordinal, in its own CUDA_VISIBLE_DEVICES numbering
  DeviceUuid device_uuid{};  // the GPU itself, whatever the importer's numbering
  HostId host_id{};
  uint32_t process_id = 0;     // with process_nonce: which process exported it (a fork is another)
  uint64_t process_nonce = 0;  // random per process, so pid reuse or pid namespaces do not confuse
};

std::vector<uint8_t> encode_cuda_ipc_blob(const CudaIpcBlob& blob);

// Any input that is not a well-formed blob (truncated, trailing bytes, wrong magic, corrupted, an
// inconsistent range) is kMalformed; another version is kUnsupportedVersion. Never crashes.
Result<CudaIpcBlob> decode_cuda_ipc_blob(std::span<const uint8_t> bytes);

// Whether this process may open the blob: kUnavailable for a blob from another host (CUDA IPC
// only reaches processes of one host), kInvalidArgument for one this very process exported.
Status check_cuda_ipc_importable(const CudaIpcBlob& blob);

// This host's identity: /proc/sys/kernel/random/boot_id (shared by the containers of one host, new
// at every boot, as CUDA IPC handles are). kUnavailable when it cannot be read.
Result<HostId> local_host_id();

// Stamps host id and process identity into `blob` (export side).
Status stamp_cuda_ipc_origin(CudaIpcBlob& blob);

}  // namespace kvf::gpudirect
