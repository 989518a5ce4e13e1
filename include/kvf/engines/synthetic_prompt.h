// synthetic_prompt: the prompt tokens the reference tools derive from a seed, so that two
// processes (a prefill engine and whoever checks it) given the same seed use the same prompt.
#pragma once

#include <cstdint>
#include <vector>

namespace kvf::engines {

inline std::vector<uint32_t> synthetic_prompt(uint32_t tokens, uint32_t vocab, uint64_t seed) {
  std::vector<uint32_t> prompt(tokens);
  uint64_t state = seed;
  for (uint32_t& t : prompt) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;  // an LCG is plenty for a prompt
    t = static_cast<uint32_t>((state >> 33) % vocab);
  }
  return prompt;
}

}  // namespace kvf::engines
