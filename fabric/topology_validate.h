// Private to the topology loader: the checks that span fields (unique names, references between
// engines, nodes and models, GPU and port assignments). Runs after reading; skips fields that
// reading already reported so one mistake yields one problem.
#pragma once

#include "kvf/fabric/topology.h"
#include "topology_reader.h"

namespace kvf::fabric::topo {

void validate_topology(const Topology& topo, ReadContext& ctx);

}  // namespace kvf::fabric::topo
