// Picks the Catch2 includes: v2 on Debian bookworm, v3 on Ubuntu 24.04. Tests include this only.
#pragma once
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
using Catch::Approx;  // v2 has it in the global namespace; tests write plain Approx
namespace Catch {
// v2's substring matcher under its v2 name (v3 calls it Matchers::ContainsSubstring).
inline Matchers::StringContainsMatcher Contains(const std::string& text) {
  return Matchers::ContainsSubstring(text);
}
}  // namespace Catch
#else
#include <catch2/catch.hpp>
#endif
