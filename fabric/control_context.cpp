// ControlContext: the io thread that runs the control channel's handlers.
#include <pthread.h>

#include <algorithm>
#include <exception>

#include <spdlog/spdlog.h>

#include "kvf/fabric/control_channel.h"

namespace kvf::fabric {

ControlContext::ControlContext() : work_(boost::asio::make_work_guard(io_)) {
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "kvf-control");
    // A handler that throws must not take the whole process down with std::terminate: log it and
    // keep serving the other connections.
    for (;;) {
      try {
        io_.run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("control channel: handler threw: {}", e.what());
      } catch (...) {
        spdlog::error("control channel: handler threw a non-std exception");
      }
    }
  });
}

void ControlContext::stop() {
  work_.reset();
  io_.stop();
  if (thread_.joinable() && std::this_thread::get_id() != thread_.get_id()) thread_.join();
}

std::vector<std::shared_ptr<ControlConnection>> ControlContext::close_and_wait(
    const std::vector<std::shared_ptr<ControlConnection>>& connections, const Status& reason,
    std::chrono::milliseconds timeout) {
  for (const auto& c : connections) c->close(reason);
  if (in_io_thread()) return connections;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<std::shared_ptr<ControlConnection>> open;
  for (const auto& c : connections) {
    const auto left = std::max(
        std::chrono::milliseconds(0),
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
    if (!c->wait_closed(left)) open.push_back(c);
  }
  return open;
}

ControlContext::~ControlContext() {
  stop();
}

}  // namespace kvf::fabric
