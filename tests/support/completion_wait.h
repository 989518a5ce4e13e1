// wait_for: starts an operation that reports through a Completion and waits for its status, at
// most 20 s (then kTimeout, so a test that would hang fails instead). For transport unit tests.
#pragma once

#include <chrono>
#include <functional>
#include <future>
#include <memory>

#include "kvf/fabric/transport.h"

inline kvf::Status wait_for(const std::function<void(kvf::fabric::Completion)>& start) {
  auto promise = std::make_shared<std::promise<kvf::Status>>();
  auto future = promise->get_future();
  start([promise](const kvf::Status& s) { promise->set_value(s); });
  if (future.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    return kvf::Status(kvf::ErrorCode::kTimeout, "test wait timed out");
  }
  return future.get();
}
