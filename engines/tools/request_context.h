// The request context a prefill engine sends with a PD stream (KvConnector::send_kv_to) and the
// decode engine reads back: prompt length, the prompt's last token and the tokens to generate, as
// three little-endian u32 (12 bytes). Shared by kvfabric-engine's CLI modes and its service.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace kvf::engines {

struct RequestContext {
  uint32_t prompt_tokens = 0;
  uint32_t last_token = 0;
  uint32_t n_new = 0;

  std::vector<uint8_t> encode() const {
    std::vector<uint8_t> out(12);
    std::memcpy(out.data(), &prompt_tokens, 4);
    std::memcpy(out.data() + 4, &last_token, 4);
    std::memcpy(out.data() + 8, &n_new, 4);
    return out;
  }
  // False for bytes that are not a context (wrong size, an empty prompt, nothing to generate).
  static bool decode(const std::vector<uint8_t>& bytes, RequestContext* out) {
    if (bytes.size() != 12) return false;
    std::memcpy(&out->prompt_tokens, bytes.data(), 4);
    std::memcpy(&out->last_token, bytes.data() + 4, 4);
    std::memcpy(&out->n_new, bytes.data() + 8, 4);
    return out->prompt_tokens != 0 && out->n_new != 0;
  }
};

}  // namespace kvf::engines
