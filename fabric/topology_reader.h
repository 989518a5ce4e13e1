// Private to the topology loader: reads YAML nodes into typed values while collecting every
// problem with its 1-based position and field path, so one pass reports all mistakes in a file.
// Not thread-safe; one ReadContext per load.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvf/fabric/topology.h"

namespace kvf::fabric::topo {

// A 1-based position in the file; {0, 0} when unknown.
struct Pos {
  int line = 0;
  int column = 0;
};

// yaml-cpp marks are 0-based and null for nodes it made up (absent keys); fall back then. An
// empty value's mark is where the next token starts, often the next line, so it falls back too.
Pos pos_of(const YAML::Node& node, Pos fallback = {});

// Field paths as operators read them: "nodes[1].nics[0].gpus".
std::string child_path(std::string_view parent, std::string_view key);
std::string index_path(std::string_view parent, size_t index);

// Collects problems and remembers where each field was, so the cross-field checks that run after
// reading can point at the right line, and can skip fields that were already reported broken.
class ReadContext {
 public:
  explicit ReadContext(std::string file) : file_(std::move(file)) {}

  void report(std::string_view path, Pos pos, std::string message);
  void remember(const std::string& path, Pos pos) { positions_[path] = pos; }
  // The position of path, or of its nearest remembered ancestor.
  Pos where(std::string_view path) const;
  // The position of exactly path, when the file has it (defaults have none).
  std::optional<Pos> find(std::string_view path) const;
  // True when a problem was reported at path or inside it (cross-checks skip such fields).
  bool broken(std::string_view path) const;
  bool ok() const { return problems_.empty(); }
  // Problems in file order (a stable sort keeps same-position problems in discovery order).
  std::vector<TopologyProblem> take_problems();

 private:
  std::string file_;
  std::vector<TopologyProblem> problems_;
  std::vector<std::string> broken_paths_;
  std::map<std::string, Pos, std::less<>> positions_;
};

// "a list", "null", "\"abc\"": what was found, for "expected X, got Y" messages.
std::string describe(const YAML::Node& node);

// A map node read once. Unknown keys (with a close-match suggestion) and duplicate keys are
// reported on construction; absent keys read as nullopt. Use only when the node is a map.
class MapReader {
 public:
  MapReader(const YAML::Node& map, std::string path, std::initializer_list<std::string_view> allowed,
            ReadContext& ctx);

  const std::string& path() const { return path_; }
  Pos pos() const { return pos_; }
  std::string field(std::string_view key) const { return child_path(path_, key); }
  std::optional<YAML::Node> get(std::string_view key) const;
  // Like get, but reports "missing required key" when absent.
  std::optional<YAML::Node> require(std::string_view key) const;

 private:
  std::string path_;
  Pos pos_;
  std::vector<std::pair<std::string, YAML::Node>> entries_;
  ReadContext& ctx_;
};

// Checks the node's kind; reports "expected a map/list, got ..." otherwise.
bool expect_map(const YAML::Node& node, std::string_view path, Pos fallback, ReadContext& ctx);
bool expect_list(const YAML::Node& node, std::string_view path, Pos fallback, ReadContext& ctx);

// Scalar readers: each remembers the field's position and reports with the field path.
std::optional<std::string> read_string(const YAML::Node& node, const std::string& path, Pos fallback,
                                       ReadContext& ctx);
std::optional<int64_t> read_int(const YAML::Node& node, const std::string& path, int64_t min, int64_t max,
                                Pos fallback, ReadContext& ctx);
std::optional<uint64_t> read_size(const YAML::Node& node, const std::string& path, Pos fallback,
                                  ReadContext& ctx);
// One of a fixed set of names; returns the index of the name in choices.
std::optional<size_t> read_choice(const YAML::Node& node, const std::string& path,
                                  std::initializer_list<std::string_view> choices, Pos fallback,
                                  ReadContext& ctx);

}  // namespace kvf::fabric::topo
