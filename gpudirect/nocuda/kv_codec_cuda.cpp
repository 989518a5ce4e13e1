// The GPU KV codecs in a build without CUDA: every call says so (kUnavailable), so callers use the
// CPU codec (kv_codec.h) instead.
#include <string>

#include "kvf/gpudirect/kv_codec_cuda.h"

namespace kvf::gpudirect {
namespace {

Status built_without_cuda(const char* what) {
  return Status(ErrorCode::kUnavailable,
                std::string(what) +
                    ": kvfabric was built without CUDA (nvcc not found); the CPU "
                    "codec (kv_codec.h: encode_chunk, decode_chunk) codes KV on the host");
}

}  // namespace

Status encode_paged_chunks_cuda(const protocol::KvCodecParams&, const PagedChunks&, void*, void*) {
  return built_without_cuda("encode_paged_chunks_cuda");
}

Status decode_paged_chunks_cuda(const protocol::KvCodecParams&, const PagedChunks&, const void*, void*) {
  return built_without_cuda("decode_paged_chunks_cuda");
}

Status encode_chunk_cuda(const protocol::KvCodecParams&, const protocol::KvChunkGeometry&, const void*, void*,
                         void*) {
  return built_without_cuda("encode_chunk_cuda");
}

Status decode_chunk_cuda(const protocol::KvCodecParams&, const protocol::KvChunkGeometry&, const void*, void*,
                         void*) {
  return built_without_cuda("decode_chunk_cuda");
}

}  // namespace kvf::gpudirect
