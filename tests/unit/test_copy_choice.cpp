// The adaptive copy choice of the cuda_ipc transport (include/kvf/fabric/copy_choice.h): every
// combination of what is known about a put, against the rule written out case by case.
#include "catch.h"

#include "kvf/fabric/copy_choice.h"

using kvf::fabric::AdaptivePath;
using kvf::fabric::AdaptivePutState;
using kvf::fabric::choose_adaptive_path;

TEST_CASE("a ready put behind others to a peer on another GPU is staged", "[copy_choice]") {
  CHECK(choose_adaptive_path({true, true, true, false}) == AdaptivePath::kStaged);
}

TEST_CASE("a lone put goes direct: no staging round trip when the link is idle", "[copy_choice]") {
  CHECK(choose_adaptive_path({true, true, false, false}) == AdaptivePath::kDirect);
}

TEST_CASE("a put still waiting for its compute goes direct, busy link or not", "[copy_choice]") {
  CHECK(choose_adaptive_path({true, false, true, false}) == AdaptivePath::kDirect);
  CHECK(choose_adaptive_path({true, false, false, false}) == AdaptivePath::kDirect);
}

TEST_CASE("a peer that refused staging gets direct puts only", "[copy_choice]") {
  CHECK(choose_adaptive_path({true, true, true, true}) == AdaptivePath::kDirect);
  CHECK(choose_adaptive_path({false, true, true, true}, true) == AdaptivePath::kDirect);
}

TEST_CASE("a peer on the same GPU is staged only with the test knob", "[copy_choice]") {
  CHECK(choose_adaptive_path({false, true, true, false}) == AdaptivePath::kDirect);
  CHECK(choose_adaptive_path({false, true, true, false}, true) == AdaptivePath::kStaged);
  CHECK(choose_adaptive_path({false, true, false, false}, true) == AdaptivePath::kDirect);
}

TEST_CASE("every combination follows the rule", "[copy_choice]") {
  for (int bits = 0; bits < 32; ++bits) {
    AdaptivePutState s{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0, (bits & 8) != 0};
    const bool same_gpu_knob = (bits & 16) != 0;
    const bool staged =
        !s.staging_refused && (s.peer_on_other_gpu || same_gpu_knob) && s.data_ready && s.link_busy;
    INFO("state bits " << bits);
    CHECK((choose_adaptive_path(s, same_gpu_knob) == AdaptivePath::kStaged) == staged);
  }
}
