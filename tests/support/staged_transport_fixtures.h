// What the ucx_staged unit tests share: a StagedTransport made with `options`, or the test fails
// at once (REQUIRE). Single-threaded test code.
#pragma once

#include <memory>
#include <utility>

#include "catch.h"
#include "kvf/fabric/staged_transport.h"
#include "kvf/gpudirect/ucx_context.h"

namespace kvf::test {

inline std::unique_ptr<fabric::StagedTransport> staged(const std::shared_ptr<gpudirect::UcxContext>& ucx,
                                                       fabric::StagedTransportOptions options) {
  auto t = fabric::StagedTransport::create(ucx, options);
  REQUIRE(t.ok());
  return std::move(t.value());
}

}  // namespace kvf::test
