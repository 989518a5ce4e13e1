#include "kvf/fabric/transport.h"

#include <memory>
#include <string>

#include "kvf/gpudirect/cuda_memory.h"

namespace kvf::fabric {
namespace {

// Looks at the event every `interval` on the progress thread; puts once it has completed.
struct EventWait : std::enable_shared_from_this<EventWait> {
  Transport& transport;
  PeerId peer;
  std::vector<PutOp> ops;
  void* event;
  Completion done;
  EventWait(Transport& t, PeerId p, std::vector<PutOp> o, void* e, Completion d)
      : transport(t), peer(p), ops(std::move(o)), event(e), done(std::move(d)) {}

  void check() {
    auto ready = gpudirect::event_done(event);
    if (!ready.ok()) {
      if (done)
        done(
            Status(ready.status().code(), "waiting for the layer's CUDA event: " + ready.status().message()));
      return;
    }
    if (!ready.value()) {
      transport.post_after(std::chrono::microseconds(5), [self = shared_from_this()] { self->check(); });
      return;
    }
    transport.put(peer, std::move(ops), std::move(done));
  }
};

}  // namespace

void Transport::put_after_event(PeerId peer, std::vector<PutOp> ops, void* cuda_event, Completion done) {
  if (cuda_event == nullptr) {
    put(peer, std::move(ops), std::move(done));
    return;
  }
  auto wait = std::make_shared<EventWait>(*this, peer, std::move(ops), cuda_event, std::move(done));
  post([wait] { wait->check(); });
}

void Transport::get(PeerId, std::vector<GetOp>, Completion done) {
  if (done)
    done(Status(ErrorCode::kUnavailable,
                "the " + std::string(name()) + " transport cannot read remote memory"));
}

}  // namespace kvf::fabric
