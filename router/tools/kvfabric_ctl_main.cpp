// kvfabric-ctl: the operator's and router's command line on RouterClient. Asks every node's
// kvfabricd (or one, with --node) over its HTTP control API and prints one line per node, naming it.
// Exit status: 0 ok, 1 the operation failed (on any node asked; lookup and best-engine: on every
// node), 2 bad usage.
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/router/router_client.h"

using namespace kvf;
using namespace kvf::router;

namespace {

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

struct UsageError {
  std::string message;
};

// The items of a list: commas, spaces, tabs and newlines all separate ("1,2,3" or "1 2 3").
std::vector<std::string> list_items(const std::string& text) {
  std::vector<std::string> items(1);
  for (char c : text) {
    if (c == ',' || c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      if (!items.back().empty()) items.emplace_back();
    } else {
      items.back() += c;
    }
  }
  if (items.back().empty()) items.pop_back();
  return items;
}

std::vector<uint32_t> parse_tokens(const std::string& text, const std::string& where) {
  std::vector<uint32_t> tokens;
  for (const std::string& item : list_items(text)) {
    size_t used = 0;
    unsigned long long v = 0;
    try {
      v = std::stoull(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || v > 0xffffffffull || item[0] == '-') {
      throw UsageError{where + ": '" + item + "' is not a token id (0..4294967295)"};
    }
    tokens.push_back(static_cast<uint32_t>(v));
  }
  return tokens;
}

std::vector<ChunkKey> parse_keys(const std::string& text, const std::string& where) {
  std::vector<ChunkKey> keys;
  for (const std::string& item : list_items(text)) {
    auto key = ChunkKey::from_hex(item);
    if (!key.ok()) throw UsageError{where + ": '" + item + "' is not a chunk key (32 hex digits)"};
    keys.push_back(key.value());
  }
  return keys;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UsageError{"cannot read " + path};
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// NAME=HOST:PORT
DaemonEndpoint parse_daemon(const std::string& text) {
  const size_t eq = text.find('=');
  const size_t colon = text.rfind(':');
  if (eq == std::string::npos || colon == std::string::npos || colon < eq) {
    throw UsageError{"--daemon '" + text + "': expected NAME=HOST:PORT"};
  }
  unsigned long port = 0;
  try {
    port = std::stoul(text.substr(colon + 1));
  } catch (const std::exception&) {
    port = 0;
  }
  if (port == 0 || port > 65535) throw UsageError{"--daemon '" + text + "': bad port"};
  return DaemonEndpoint{text.substr(0, eq), text.substr(eq + 1, colon - eq - 1), static_cast<uint16_t>(port)};
}

std::string node_label(const std::string& node, const std::string& endpoint) {
  return "node " + node + " (" + endpoint + ")";
}

// Prints one failed node's line; DOWN when it was not reached at all.
template <typename T>
void print_failure(const NodeReply<T>& r) {
  std::printf("%s: %s: %s\n", node_label(r.node, r.endpoint).c_str(), r.reached ? "FAILED" : "DOWN",
              r.result.status().to_string().c_str());
}

template <typename T, typename Print>
int print_nodes(const Result<std::vector<NodeReply<T>>>& replies, Print print) {
  if (!replies.ok()) {
    std::fprintf(stderr, "kvfabric-ctl: %s\n", replies.status().to_string().c_str());
    return kFailed;
  }
  int rc = kOk;
  for (const auto& r : replies.value()) {
    if (r.result.ok()) {
      std::printf("%s: ", node_label(r.node, r.endpoint).c_str());
      print(r.result.value());
      std::printf("\n");
    } else {
      print_failure(r);
      rc = kFailed;
    }
  }
  return rc;
}

void print_lookup(const LookupReport& report) {
  std::printf("model=%s query_chunks=%u\n", report.model.c_str(), report.query_chunks);
  for (const auto& n : report.nodes) {
    if (n.result.ok()) {
      std::printf("%s: up matched_tokens=%llu matched_chunks=%u tier=%s\n",
                  node_label(n.node, n.endpoint).c_str(),
                  static_cast<unsigned long long>(n.result->matched_tokens), n.result->matched_chunks,
                  std::string(tier_name(n.result->tier)).c_str());
    } else {
      print_failure(n);
    }
  }
  for (const auto& e : report.engines) {
    std::printf("engine %s on node %s (role %s): matched_tokens=%llu matched_chunks=%u tier=%s\n",
                e.engine.empty() ? "-" : e.engine.c_str(), e.node.c_str(),
                e.role.empty() ? "-" : e.role.c_str(), static_cast<unsigned long long>(e.matched_tokens),
                e.matched_chunks, std::string(tier_name(e.tier)).c_str());
  }
}

int run(int argc, char** argv) {
  cxxopts::Options cli(
      "kvfabric-ctl",
      "Ask the cluster's kvfabricd daemons about cached prefixes, and pin, unpin, clear, move.\n"
      "  kvfabric-ctl --topology FILE [--node N] COMMAND [options]\n"
      "  commands: lookup | best-engine | keys (--model M --tokens 1,2,3 | --tokens-file F)\n"
      "            pin | unpin (--keys K,K | --model M --tokens ...)\n"
      "            clear (--all | --model M | --keys K,K | --model M --tokens ...)\n"
      "            move --from A --to B (--keys ... | --model M --tokens ...) [--copy]\n"
      "            health | stats\n"
      "  exit status: 0 ok, 1 the operation failed (lookup/best-engine: no node answered;\n"
      "  others: some node asked failed), 2 bad usage");
  cli.add_options()                                                                               //
      ("command", "the command", cxxopts::value<std::string>())                                   //
      ("topology", "the cluster's topology YAML", cxxopts::value<std::string>())                  //
      ("daemon", "NAME=HOST:PORT of a daemon (repeatable; instead of --topology)",                //
       cxxopts::value<std::vector<std::string>>())                                                //
      ("node", "ask only this node", cxxopts::value<std::string>()->default_value(""))            //
      ("model", "model name (as in the topology)", cxxopts::value<std::string>())                 //
      ("tokens", "token ids, comma separated", cxxopts::value<std::string>())                     //
      ("tokens-file", "file of token ids (commas or whitespace)", cxxopts::value<std::string>())  //
      ("keys", "chunk keys (32 hex digits), comma separated", cxxopts::value<std::string>())      //
      ("keys-file", "file of chunk keys, one a line", cxxopts::value<std::string>())              //
      ("all", "clear: every entry (--model M alone: every entry of that model)")                  //
      ("from", "move: source node", cxxopts::value<std::string>())                                //
      ("to", "move: destination node", cxxopts::value<std::string>())                             //
      ("copy", "move: keep the entries at the source too")                                        //
      ("timeout-ms", "limit of each call, all nodes at once",
       cxxopts::value<uint32_t>()->default_value("2000"))  //
      ("h,help", "this help");
  cli.parse_positional({"command"});
  cli.positional_help("COMMAND");
  cxxopts::ParseResult args;
  try {
    args = cli.parse(argc, argv);
  } catch (const std::exception& e) {
    throw UsageError{e.what()};
  }
  if (args.count("help")) {
    std::printf("%s\n", cli.help().c_str());
    return kOk;
  }
  if (!args.count("command")) throw UsageError{"no command given (see --help)"};
  const std::string command = args["command"].as<std::string>();
  const std::string node = args["node"].as<std::string>();

  RouterOptions options;
  options.timeout = std::chrono::milliseconds(args["timeout-ms"].as<uint32_t>());
  RouterConfig config;
  if (args.count("topology") && args.count("daemon"))
    throw UsageError{"give --topology or --daemon, not both"};
  if (args.count("topology")) {
    auto loaded = RouterConfig::from_topology_file(args["topology"].as<std::string>());
    if (!loaded.ok()) throw UsageError{loaded.status().message()};
    config = std::move(loaded.value());
  } else if (args.count("daemon")) {
    for (const auto& d : args["daemon"].as<std::vector<std::string>>())
      config.daemons.push_back(parse_daemon(d));
  } else {
    throw UsageError{"--topology FILE (or --daemon NAME=HOST:PORT) is required"};
  }
  RouterClient client(std::move(config), options);

  auto model = [&]() -> std::string {
    if (!args.count("model")) throw UsageError{command + " needs --model"};
    return args["model"].as<std::string>();
  };
  auto tokens = [&]() -> std::vector<uint32_t> {
    if (args.count("tokens") && args.count("tokens-file")) throw UsageError{"give --tokens or --tokens-file"};
    if (args.count("tokens")) return parse_tokens(args["tokens"].as<std::string>(), "--tokens");
    if (args.count("tokens-file")) {
      const std::string path = args["tokens-file"].as<std::string>();
      return parse_tokens(read_file(path), path);
    }
    throw UsageError{command + " needs --tokens or --tokens-file"};
  };
  auto has_tokens = [&] { return args.count("tokens") || args.count("tokens-file"); };
  // Keys given directly, or the chunk keys of a prompt.
  auto keys = [&]() -> std::vector<ChunkKey> {
    const int given =
        (args.count("keys") ? 1 : 0) + (args.count("keys-file") ? 1 : 0) + (has_tokens() ? 1 : 0);
    if (given != 1)
      throw UsageError{command + " needs exactly one of --keys, --keys-file, --model with --tokens"};
    if (args.count("keys")) return parse_keys(args["keys"].as<std::string>(), "--keys");
    if (args.count("keys-file")) {
      const std::string path = args["keys-file"].as<std::string>();
      return parse_keys(read_file(path), path);
    }
    const std::string m = model();
    auto hashed = client.chunk_keys(m, tokens());
    if (!hashed.ok()) throw UsageError{hashed.status().message()};
    return hashed.value();
  };

  if (command == "keys") {
    auto hashed = client.chunk_keys(model(), tokens());
    if (!hashed.ok()) throw UsageError{hashed.status().message()};
    for (const auto& k : hashed.value()) std::printf("%s\n", k.to_hex().c_str());
    return kOk;
  }
  if (command == "lookup" || command == "best-engine") {
    const std::string m = model();
    const std::vector<uint32_t> t = tokens();
    if (command == "lookup") {
      auto report = client.lookup(m, t, node);
      if (!report.ok()) {
        std::fprintf(stderr, "kvfabric-ctl: lookup: %s\n", report.status().to_string().c_str());
        return report.status().code() == ErrorCode::kInvalidArgument ||
                       report.status().code() == ErrorCode::kNotFound
                   ? kUsage
                   : kFailed;
      }
      print_lookup(report.value());
      return report->nodes_down() == report->nodes.size() && !report->nodes.empty() ? kFailed : kOk;
    }
    if (!node.empty()) throw UsageError{"best-engine asks every node; --node does not apply"};
    auto best = client.best_engine(m, t);
    if (!best.ok()) {
      std::fprintf(stderr, "kvfabric-ctl: best-engine: %s\n", best.status().to_string().c_str());
      return best.status().code() == ErrorCode::kInvalidArgument ? kUsage : kFailed;
    }
    print_lookup(best->report);
    const EngineMatch& e = best->engine;
    std::printf("best: engine=%s node=%s role=%s matched_tokens=%llu cached=%s\n",
                e.engine.empty() ? "-" : e.engine.c_str(), e.node.c_str(),
                e.role.empty() ? "-" : e.role.c_str(), static_cast<unsigned long long>(e.matched_tokens),
                best->cached ? "yes" : "no");
    return best->report.nodes_down() == best->report.nodes.size() && !best->report.nodes.empty() ? kFailed
                                                                                                 : kOk;
  }
  if (command == "pin" || command == "unpin") {
    const std::vector<ChunkKey> k = keys();
    const bool pin = command == "pin";
    auto replies = pin ? client.pin(k, node) : client.unpin(k, node);
    return print_nodes(replies, [&](const PinCount& c) {
      std::printf("%s=%llu not_found=%zu", pin ? "pinned" : "unpinned",
                  static_cast<unsigned long long>(c.changed), c.not_found.size());
    });
  }
  if (command == "clear") {
    const bool all = args.count("all") > 0;
    const bool some = args.count("keys") || args.count("keys-file") || has_tokens();
    // --model without keys or tokens: that model's entries (with --tokens it only hashes them).
    const bool by_model = args.count("model") > 0 && !some;
    if ((all ? 1 : 0) + (some ? 1 : 0) + (by_model ? 1 : 0) != 1) {
      throw UsageError{
          "clear needs exactly one of --all, --model M (its entries), or keys (--keys, --keys-file, --model "
          "with --tokens)"};
    }
    auto replies = all        ? client.clear_all(node)
                   : by_model ? client.clear_model(args["model"].as<std::string>(), node)
                              : client.clear_keys(keys(), node);
    return print_nodes(replies, [](const ClearCount& c) {
      std::printf("cleared=%llu freed_bytes=%llu", static_cast<unsigned long long>(c.cleared),
                  static_cast<unsigned long long>(c.freed_bytes));
    });
  }
  if (command == "move") {
    if (!args.count("from") || !args.count("to")) throw UsageError{"move needs --from and --to"};
    auto moved = client.move(args["from"].as<std::string>(), args["to"].as<std::string>(), keys(),
                             args.count("copy") > 0);
    if (!moved.ok()) {
      std::fprintf(stderr, "kvfabric-ctl: move: %s\n", moved.status().to_string().c_str());
      return kFailed;
    }
    std::printf("moved=%llu bytes=%llu not_found=%zu\n", static_cast<unsigned long long>(moved->moved),
                static_cast<unsigned long long>(moved->bytes), moved->not_found.size());
    return kOk;
  }
  if (command == "health") {
    int rc = print_nodes(client.health(node), [](const NodeHealth& h) {
      std::printf("%s version=%s uptime_s=%.1f", h.healthy ? "ok" : "UNHEALTHY", h.version.c_str(),
                  h.uptime_s);
      for (const auto& p : h.problems) std::printf(" problem=\"%s\"", p.c_str());
    });
    return rc;
  }
  if (command == "stats") {
    return print_nodes(client.stats(node), [](const NodeStats& s) {
      std::printf(
          "entries=%llu pinned=%llu leased=%llu lookups=%llu", static_cast<unsigned long long>(s.entries),
          static_cast<unsigned long long>(s.pinned_entries),
          static_cast<unsigned long long>(s.leased_entries), static_cast<unsigned long long>(s.lookups));
      for (const auto& t : s.tiers) {
        std::printf(" %s: used=%llu/%llu hits=%llu misses=%llu evictions=%llu",
                    std::string(tier_name(t.tier)).c_str(), static_cast<unsigned long long>(t.used_bytes),
                    static_cast<unsigned long long>(t.capacity_bytes),
                    static_cast<unsigned long long>(t.hits), static_cast<unsigned long long>(t.misses),
                    static_cast<unsigned long long>(t.evictions));
      }
    });
  }
  throw UsageError{"unknown command '" + command + "' (see --help)"};
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "kvfabric-ctl: %s\n", e.message.c_str());
    return kUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvfabric-ctl: %s\n", e.what());
    return kFailed;
  }
}
