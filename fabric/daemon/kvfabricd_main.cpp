// kvfabricd: the per-node daemon. This version checks topology files; running the daemon (store,
// control API) arrives with the prefix store, and until then it says so instead of pretending.
#include <cxxopts.hpp>

#include <exception>
#include <iostream>
#include <string>

#include "kvf/fabric/topology.h"
#include "kvf/fabric/version.h"

namespace {

// Exit codes: 0 fine, 2 the input (arguments, topology) is wrong or the mode is not available.
constexpr int kExitOk = 0;
constexpr int kExitBadInput = 2;

int check_topology(const std::string& path) {
  const kvf::fabric::TopologyLoad load = kvf::fabric::load_topology_file(path);
  if (!load.topology) {
    for (const auto& problem : load.problems) std::cerr << problem.to_string() << '\n';
    std::cerr << "kvfabricd: " << path << " is not a valid topology (" << load.problems.size()
              << (load.problems.size() == 1 ? " problem" : " problems") << ")\n";
    return kExitBadInput;
  }
  const kvf::fabric::Topology& t = *load.topology;
  std::cout << path << ": ok (" << t.nodes.size() << " nodes, " << t.engines.size() << " engines, "
            << t.models.size() << " models)\n";
  return kExitOk;
}

int run(int argc, char** argv) {
  cxxopts::Options options("kvfabricd", "kvfabric node daemon: prefix store and control API for one node");
  options.add_options()  //
      ("check-topology", "validate a topology file, print every problem, and exit",
       cxxopts::value<std::string>(), "FILE")                                                           //
      ("topology", "the cluster topology file to run with", cxxopts::value<std::string>(), "FILE")      //
      ("node", "which node of the topology this daemon serves", cxxopts::value<std::string>(), "NAME")  //
      ("version", "print the version and exit")                                                         //
      ("h,help", "print this help and exit");
  const auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << '\n';
    return kExitOk;
  }
  if (args.count("version")) {
    std::cout << "kvfabricd " << kvf::fabric::version() << '\n';
    return kExitOk;
  }
  if (!args.unmatched().empty()) {
    std::cerr << "kvfabricd: unexpected argument '" << args.unmatched().front() << "' (see --help)\n";
    return kExitBadInput;
  }
  if (args.count("check-topology")) {
    if (args.count("topology") || args.count("node")) {
      std::cerr << "kvfabricd: --check-topology takes no other options\n";
      return kExitBadInput;
    }
    return check_topology(args["check-topology"].as<std::string>());
  }
  if (args.count("topology") || args.count("node")) {
    std::cerr << "kvfabricd: running the daemon is not implemented yet in this version: the daemon's store "
                 "and control API come with the prefix store (use --check-topology FILE to validate a "
                 "topology)\n";
    return kExitBadInput;
  }
  std::cerr << "kvfabricd: nothing to do; try --check-topology FILE or --help\n";
  return kExitBadInput;
}

}  // namespace

int main(int argc, char** argv) {
  // Bad options surface as cxxopts exceptions; report them as usage errors, not as a crash.
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kvfabricd: " << e.what() << " (see --help)\n";
    return kExitBadInput;
  }
}
