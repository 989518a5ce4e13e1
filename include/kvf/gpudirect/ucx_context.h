// UcxContext: one UCX context (ucp_context_h) per process, shared by every memory region and
// worker that uses it. Created once at setup (exceptions are not used: create() returns a Status).
// Thread-safe to share: UCX contexts are created in multi-thread mode.
#pragma once

#include <ucp/api/ucp.h>

#include <memory>

#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

class UcxContext {
 public:
  // Features: RMA (one-sided put/get), AM (notifications), WAKEUP (sleep when idle).
  static Result<std::shared_ptr<UcxContext>> create();
  ~UcxContext();
  UcxContext(const UcxContext&) = delete;
  UcxContext& operator=(const UcxContext&) = delete;

  ucp_context_h handle() const { return context_; }
  // Whether this UCX can register and move CUDA device memory (ucp_context_query reports
  // UCS_MEMORY_TYPE_CUDA among its memory types): only UCX built with its cuda modules, loaded at
  // run time, does. Debian's UCX does not; never assume it.
  bool supports_cuda_memory() const { return supports_cuda_memory_; }

 private:
  UcxContext(ucp_context_h context, bool supports_cuda_memory)
      : context_(context), supports_cuda_memory_(supports_cuda_memory) {}
  ucp_context_h context_;
  bool supports_cuda_memory_;
};

// "UCX error: Destination is unreachable (UCS_ERR_UNREACHABLE)"
std::string ucx_status_string(ucs_status_t status);

}  // namespace kvf::gpudirect
