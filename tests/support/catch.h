// Picks the Catch2 includes: v2 on Debian bookworm, v3 on Ubuntu 24.04. Tests include this only.
#pragma once
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
using Catch::Approx;  // v2 has it in the global namespace; tests write plain Approx
#else
#include <catch2/catch.hpp>
#endif
