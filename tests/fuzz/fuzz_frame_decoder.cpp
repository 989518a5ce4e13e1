// libFuzzer target over the control-frame and notification decoders; see frame_decoder_entry.h.
#include <cstddef>
#include <cstdint>

#include "frame_decoder_entry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return kvf::protocol::testing::fuzz_frame_decoder(data, size);
}
