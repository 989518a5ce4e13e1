// KvCacheView: an engine's registered paged KV caches as the reference engine reads and writes
// them: the layout and one base pointer per layer buffer, exactly what an engine registers with the
// fabric. Not owning: the buffers belong to the engine (or a HostKvPool) and must outlive every
// call made with the view. Thread rules: a view is a value; the bytes behind it are shared, and
// requests that run at once must use disjoint blocks.
#pragma once

#include <cstdint>
#include <vector>

#include "kvf/protocol/kv_layout.h"

namespace kvf::engines {

struct KvCacheView {
  protocol::KvLayout layout;
  std::vector<uint8_t*> layers;  // layout.desc().num_layers pointers, each layout.layer_bytes() long
};

}  // namespace kvf::engines
