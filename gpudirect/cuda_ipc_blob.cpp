#include "kvf/gpudirect/cuda_ipc_blob.h"

#include <unistd.h>
#include <xxhash.h>

#include <cstdio>
#include <random>
#include <string>

namespace kvf::gpudirect {
namespace {

constexpr size_t kChecksumOffset = CudaIpcBlob::kEncodedBytes - 4;

void put_u16(std::vector<uint8_t>& out, uint16_t v) {
  for (int i = 0; i < 2; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
template <size_t N>
void put_bytes(std::vector<uint8_t>& out, const std::array<uint8_t, N>& a) {
  out.insert(out.end(), a.begin(), a.end());
}

// Reads fixed-width fields from a span whose length was checked once, up front.
class FieldReader {
 public:
  explicit FieldReader(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  uint64_t uint(int width) {
    uint64_t v = 0;
    for (int i = 0; i < width; ++i) v |= static_cast<uint64_t>(bytes_[pos_ + i]) << (8 * i);
    pos_ += width;
    return v;
  }
  template <size_t N>
  void bytes(std::array<uint8_t, N>& out) {
    for (size_t i = 0; i < N; ++i) out[i] = bytes_[pos_ + i];
    pos_ += N;
  }

 private:
  std::span<const uint8_t> bytes_;
  size_t pos_ = 0;
};

Status malformed(const std::string& what) {
  return Status(ErrorCode::kMalformed, "CUDA IPC blob: " + what);
}

uint64_t process_nonce() {
  // Drawn once per process; a forked child inherits it, so the pid is compared as well.
  static const uint64_t nonce = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  return nonce;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string hex_prefix(const HostId& id) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < 4; ++i) {
    s += digits[id[i] >> 4];
    s += digits[id[i] & 15];
  }
  return s + "...";
}

}  // namespace

std::vector<uint8_t> encode_cuda_ipc_blob(const CudaIpcBlob& blob) {
  std::vector<uint8_t> out;
  out.reserve(CudaIpcBlob::kEncodedBytes);
  put_u32(out, CudaIpcBlob::kMagic);
  put_u16(out, CudaIpcBlob::kVersion);
  put_u16(out, static_cast<uint16_t>(CudaIpcBlob::kEncodedBytes));
  put_u32(out, static_cast<uint32_t>(blob.device));
  put_u32(out, blob.process_id);
  put_u64(out, blob.offset);
  put_u64(out, blob.length);
  put_u64(out, blob.allocation_bytes);
  put_bytes(out, blob.device_uuid);
  put_bytes(out, blob.host_id);
  put_u64(out, blob.process_nonce);
  put_bytes(out, blob.ipc_handle);
  put_u32(out, XXH32(out.data(), out.size(), 0));
  return out;
}

Result<CudaIpcBlob> decode_cuda_ipc_blob(std::span<const uint8_t> bytes) {
  // Magic and version first, so that a newer exporter's blob reads as a version mismatch rather
  // than as a wrong size.
  if (bytes.size() < 8) {
    return malformed("truncated: " + std::to_string(bytes.size()) + " bytes, a blob has " +
                     std::to_string(CudaIpcBlob::kEncodedBytes));
  }
  FieldReader r(bytes);
  const auto magic = static_cast<uint32_t>(r.uint(4));
  if (magic != CudaIpcBlob::kMagic) {
    char text[16];
    std::snprintf(text, sizeof text, "0x%08x", magic);
    return malformed(std::string("wrong magic ") + text + " (not a kvfabric CUDA IPC blob)");
  }
  const auto version = static_cast<uint16_t>(r.uint(2));
  if (version != CudaIpcBlob::kVersion) {
    return Status(ErrorCode::kUnsupportedVersion, "CUDA IPC blob: version " + std::to_string(version) +
                                                      ", this build reads version " +
                                                      std::to_string(CudaIpcBlob::kVersion));
  }
  const auto size = static_cast<uint16_t>(r.uint(2));
  if (size != CudaIpcBlob::kEncodedBytes || bytes.size() != CudaIpcBlob::kEncodedBytes) {
    return malformed("size field " + std::to_string(size) + ", " + std::to_string(bytes.size()) +
                     " bytes given, version 1 has " + std::to_string(CudaIpcBlob::kEncodedBytes));
  }
  const uint32_t expected = XXH32(bytes.data(), kChecksumOffset, 0);
  CudaIpcBlob blob;
  blob.device = static_cast<int32_t>(static_cast<uint32_t>(r.uint(4)));
  blob.process_id = static_cast<uint32_t>(r.uint(4));
  blob.offset = r.uint(8);
  blob.length = r.uint(8);
  blob.allocation_bytes = r.uint(8);
  r.bytes(blob.device_uuid);
  r.bytes(blob.host_id);
  blob.process_nonce = r.uint(8);
  r.bytes(blob.ipc_handle);
  const auto checksum = static_cast<uint32_t>(r.uint(4));
  if (checksum != expected) return malformed("checksum mismatch (corrupted in transit)");
  if (blob.device < 0) return malformed("negative device ordinal " + std::to_string(blob.device));
  if (blob.length == 0) return malformed("empty range");
  if (blob.offset > blob.allocation_bytes || blob.length > blob.allocation_bytes - blob.offset) {
    return malformed("range [" + std::to_string(blob.offset) + ", +" + std::to_string(blob.length) +
                     ") lies outside its allocation of " + std::to_string(blob.allocation_bytes) + " bytes");
  }
  return blob;
}

Result<HostId> local_host_id() {
  static const Result<HostId> id = []() -> Result<HostId> {
    const char* path = "/proc/sys/kernel/random/boot_id";
    std::FILE* f = std::fopen(path, "r");
    if (f == nullptr) return Status(ErrorCode::kUnavailable, std::string("cannot read ") + path);
    char text[64] = {};
    const size_t n = std::fread(text, 1, sizeof text - 1, f);
    std::fclose(f);
    HostId out{};
    size_t digits = 0;
    for (size_t i = 0; i < n && digits < 32; ++i) {
      const int v = hex_value(text[i]);
      if (v < 0) continue;  // the dashes and the newline
      out[digits / 2] = static_cast<uint8_t>(out[digits / 2] | (v << (digits % 2 == 0 ? 4 : 0)));
      ++digits;
    }
    if (digits != 32) return Status(ErrorCode::kUnavailable, std::string(path) + " does not hold a UUID");
    return out;
  }();
  return id;
}

Status stamp_cuda_ipc_origin(CudaIpcBlob& blob) {
  Result<HostId> host = local_host_id();
  if (!host.ok()) return host.status();
  blob.host_id = *host;
  blob.process_id = static_cast<uint32_t>(getpid());
  blob.process_nonce = process_nonce();
  return Status::Ok();
}

Status check_cuda_ipc_importable(const CudaIpcBlob& blob) {
  Result<HostId> host = local_host_id();
  if (!host.ok()) return host.status();
  if (blob.host_id != *host) {
    return Status(ErrorCode::kUnavailable, "CUDA IPC blob comes from another host (boot id " +
                                               hex_prefix(blob.host_id) + ", this host " + hex_prefix(*host) +
                                               "): CUDA IPC only maps memory between processes of one host");
  }
  if (blob.process_id == static_cast<uint32_t>(getpid()) && blob.process_nonce == process_nonce()) {
    return Status(ErrorCode::kInvalidArgument,
                  "CUDA IPC blob was exported by this process: CUDA cannot open an IPC handle in the "
                  "process that exported it; use the device pointer directly");
  }
  return Status::Ok();
}

}  // namespace kvf::gpudirect
