// kvfabricd: the per-node daemon. `--check-topology FILE` validates a topology file;
// `--topology FILE --node NAME` runs the node's daemon (node_daemon.h): the prefix store in shared
// memory, the store RPC for engines on a Unix socket, the HTTP/JSON control API, until SIGTERM.
#include <cxxopts.hpp>

#include <exception>
#include <iostream>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "kvf/fabric/topology.h"
#include "kvf/fabric/version.h"
#include "node_daemon.h"

namespace {

using kvf::daemon::kExitBadInput;
using kvf::daemon::kExitOk;

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

std::chrono::milliseconds positive_ms(const cxxopts::ParseResult& args, const std::string& name) {
  const int64_t v = args[name].as<int64_t>();
  if (v <= 0) throw std::invalid_argument("--" + name + " must be a positive number of milliseconds");
  return std::chrono::milliseconds(v);
}

int run(int argc, char** argv) {
  cxxopts::Options options("kvfabricd", "kvfabric node daemon: prefix store and control API for one node");
  options.add_options()  //
      ("check-topology", "validate a topology file, print every problem, and exit",
       cxxopts::value<std::string>(), "FILE")                                                           //
      ("topology", "the cluster topology file to run with", cxxopts::value<std::string>(), "FILE")      //
      ("node", "which node of the topology this daemon serves", cxxopts::value<std::string>(), "NAME")  //
      ("socket", "engines' Unix socket (default: the node's store.socket, /tmp/kvfabric-NODE.sock)",
       cxxopts::value<std::string>(), "PATH")  //
      ("http-host", "address of the HTTP control API (default: the node's address)",
       cxxopts::value<std::string>(), "HOST")  //
      ("http-port", "port of the HTTP control API (default: the node's http_port; 0: any free port)",
       cxxopts::value<uint16_t>(), "PORT")  //
      ("reservation-timeout-ms", "free a reservation not committed within this time",
       cxxopts::value<int64_t>()->default_value("30000"), "MS")  //
      ("lease-timeout-ms", "end a lease not released within this time",
       cxxopts::value<int64_t>()->default_value("30000"), "MS")  //
      ("reap-interval-ms", "how often expired reservations and leases are freed",
       cxxopts::value<int64_t>()->default_value("1000"), "MS")  //
      ("drain-ms", "on SIGTERM, how long engines' requests in flight may take to finish",
       cxxopts::value<int64_t>()->default_value("5000"), "MS")  //
      ("no-huge-pages", "do not try hugetlbfs for the arena")   //
      ("ssd-io", "the SSD tier's I/O: auto (O_DIRECT where the file system allows it), direct or buffered",
       cxxopts::value<std::string>()->default_value("auto"), "MODE")  //
      ("peer-port",
       "port where the other nodes' daemons reach this one (default: the node's control_port; 0: any)",
       cxxopts::value<uint16_t>())                                                //
      ("no-peers", "serve this node alone: no remote lookups, fetches or moves")  //
      ("fetch-by", "how fetched bytes cross: put (the holder writes; fast on tcp) or get (this node reads)",
       cxxopts::value<std::string>()->default_value("put"), "put|get")  //
      ("log-level", "trace, debug, info, warn, error", cxxopts::value<std::string>()->default_value("info"),
       "LEVEL")                                  //
      ("version", "print the version and exit")  //
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
  if (args.count("topology") == 0 || args.count("node") == 0) {
    std::cerr
        << "kvfabricd: give --topology FILE and --node NAME to run, or --check-topology FILE (see --help)\n";
    return kExitBadInput;
  }
  const auto level = spdlog::level::from_str(args["log-level"].as<std::string>());
  if (level == spdlog::level::off && args["log-level"].as<std::string>() != "off") {
    std::cerr << "kvfabricd: unknown --log-level '" << args["log-level"].as<std::string>() << "'\n";
    return kExitBadInput;
  }
  // Logs go to stderr (stdout stays free for what a command prints).
  spdlog::set_default_logger(spdlog::stderr_color_mt("kvfabricd"));
  spdlog::set_level(level);
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%n] [%l] %v");

  kvf::daemon::NodeDaemonOptions daemon;
  daemon.topology_file = args["topology"].as<std::string>();
  daemon.node = args["node"].as<std::string>();
  if (args.count("socket")) daemon.socket_path = args["socket"].as<std::string>();
  if (args.count("http-host")) daemon.http_host = args["http-host"].as<std::string>();
  if (args.count("http-port")) daemon.http_port = args["http-port"].as<uint16_t>();
  daemon.reservation_timeout = positive_ms(args, "reservation-timeout-ms");
  daemon.lease_timeout = positive_ms(args, "lease-timeout-ms");
  daemon.reap_interval = positive_ms(args, "reap-interval-ms");
  daemon.drain_grace = positive_ms(args, "drain-ms");
  daemon.huge_pages = args.count("no-huge-pages") == 0;
  const std::string ssd_io = args["ssd-io"].as<std::string>();
  if (ssd_io == "auto") {
    daemon.ssd_io = kvf::store::SsdIoMode::kAuto;
  } else if (ssd_io == "direct") {
    daemon.ssd_io = kvf::store::SsdIoMode::kDirect;
  } else if (ssd_io == "buffered") {
    daemon.ssd_io = kvf::store::SsdIoMode::kBuffered;
  } else {
    std::cerr << "kvfabricd: --ssd-io must be auto, direct or buffered, got '" << ssd_io << "'\n";
    return kExitBadInput;
  }
  if (args.count("peer-port")) daemon.peer_port = args["peer-port"].as<uint16_t>();
  daemon.peers = args.count("no-peers") == 0;
  const std::string fetch_by = args["fetch-by"].as<std::string>();
  if (fetch_by != "put" && fetch_by != "get") {
    std::cerr << "kvfabricd: --fetch-by must be put or get, got '" << fetch_by << "'\n";
    return kExitBadInput;
  }
  daemon.fetch_by_get = fetch_by == "get";
  return kvf::daemon::run_node_daemon(daemon);
}

}  // namespace

int main(int argc, char** argv) {
  // Bad options surface as cxxopts (or our own) exceptions; report them as usage errors, not as a crash.
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kvfabricd: " << e.what() << " (see --help)\n";
    return kExitBadInput;
  }
}
