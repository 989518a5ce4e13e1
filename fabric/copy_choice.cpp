#include "kvf/fabric/copy_choice.h"

namespace kvf::fabric {

AdaptivePath choose_adaptive_path(const AdaptivePutState& put, bool stage_same_gpu) {
  if (put.staging_refused) return AdaptivePath::kDirect;
  if (!put.peer_on_other_gpu && !stage_same_gpu) return AdaptivePath::kDirect;
  // A put whose layer is still computing is latency-bound: when its event fires, nothing of the
  // request may be left behind it but its own copy.
  if (!put.data_ready) return AdaptivePath::kDirect;
  return put.link_busy ? AdaptivePath::kStaged : AdaptivePath::kDirect;
}

}  // namespace kvf::fabric
