// Runs the frame decoder fuzz entry over ~200k mutations of valid frames in every build, so that
// the decoders' "never crash, never read out of range" promise is exercised even without clang's
// libFuzzer (and under valgrind/ASan builds of the unit tests).
#include <xxhash.h>

#include <random>

#include "../fuzz/frame_decoder_entry.h"
#include "../fuzz/sample_messages.h"
#include "catch.h"

using namespace kvf::protocol;
using namespace kvf::protocol::testing;

namespace {

void put_u32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + static_cast<size_t>(i)] = static_cast<uint8_t>(v >> (8 * i));
}

// After mutating a frame, sometimes repair its length and checksum so that the mutation gets
// past the header and the checksum into the payload decoder.
void repair_header(std::vector<uint8_t>& f) {
  if (f.size() < kFrameHeaderBytes) return;
  const size_t n = f.size() - kFrameHeaderBytes;
  put_u32(f, 8, static_cast<uint32_t>(n));
  const auto type = static_cast<MessageType>(f[6] | (f[7] << 8));
  put_u32(f, 12, XXH32(f.data() + kFrameHeaderBytes, n, frame_checksum_seed(type)));
}

void mutate(std::vector<uint8_t>& f, MessageFactory& r) {
  const int steps = 1 + static_cast<int>(r.below(4));
  for (int s = 0; s < steps; ++s) {
    const size_t at = f.empty() ? 0 : r.below(f.size());
    switch (r.below(7)) {
      case 0:  // flip a bit
        if (!f.empty()) f[at] = static_cast<uint8_t>(f[at] ^ (1u << r.below(8)));
        break;
      case 1:  // set a byte to an interesting value
        if (!f.empty()) f[at] = std::array<uint8_t, 5>{0, 1, 0x7f, 0x80, 0xff}[r.below(5)];
        break;
      case 2:  // truncate
        f.resize(r.below(f.size() + 1));
        break;
      case 3:  // insert bytes
        f.insert(f.begin() + static_cast<std::ptrdiff_t>(at), r.below(8) + 1,
                 static_cast<uint8_t>(r.below(256)));
        break;
      case 4:  // erase bytes
        if (!f.empty())
          f.erase(f.begin() + static_cast<std::ptrdiff_t>(at),
                  f.begin() + static_cast<std::ptrdiff_t>(std::min(f.size(), at + r.below(8) + 1)));
        break;
      case 5:  // write a large little-endian count somewhere (hostile lengths)
        if (f.size() >= 4) put_u32(f, r.below(f.size() - 3), static_cast<uint32_t>(r.u64()) | 0x01000000u);
        break;
      default:  // append garbage
        f.push_back(static_cast<uint8_t>(r.below(256)));
        break;
    }
  }
  if (r.below(2) == 0) repair_header(f);
}

}  // namespace

TEST_CASE("the frame decoder survives ~200k mutated frames") {
  MessageFactory r(20240601);
  std::vector<std::vector<uint8_t>> seeds;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    for (const Message& m : sample_messages(seed)) seeds.push_back(encode_frame(m));
  }
  for (int i = 0; i < 4; ++i) {
    const auto n = encode_notification(r.notification());
    seeds.emplace_back(n.begin(), n.end());
  }
  size_t decoded = 0;
  for (int i = 0; i < 200000; ++i) {
    std::vector<uint8_t> f = seeds[r.below(seeds.size())];
    mutate(f, r);
    fuzz_frame_decoder(f.data(), f.size());
    decoded += decode_frame(f).ok() ? 1 : 0;
  }
  // Unmodified seeds go through the entry too: they must decode and re-encode exactly.
  for (const auto& s : seeds) fuzz_frame_decoder(s.data(), s.size());
  // Some mutations (header repaired, payload still valid) decode: the checks ran on real messages.
  CHECK(decoded > 100);
}
