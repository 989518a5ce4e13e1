#include "topology_reader.h"

#include <algorithm>
#include <charconv>
#include <string>

#include "topology_size.h"
#include "topology_suggest.h"

namespace kvf::fabric::topo {

namespace {

std::string quoted(std::string_view text) {
  // Long values are cut so that one bad field cannot flood the terminal.
  constexpr size_t kMax = 60;
  std::string out = "\"";
  for (char c : text.substr(0, kMax)) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  if (text.size() > kMax) out += "...";
  out += '"';
  return out;
}

std::string join(std::initializer_list<std::string_view> names) {
  std::string out;
  for (std::string_view name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

// The paths a and b are the same field, or one contains the other.
bool related(std::string_view a, std::string_view b) {
  if (a.size() > b.size()) std::swap(a, b);
  if (b.substr(0, a.size()) != a) return false;
  return b.size() == a.size() || b[a.size()] == '.' || b[a.size()] == '[';
}

}  // namespace

Pos pos_of(const YAML::Node& node, Pos fallback) {
  if (!node.IsDefined() || node.IsNull()) return fallback;
  const YAML::Mark mark = node.Mark();
  if (mark.is_null() || mark.line < 0 || mark.column < 0) return fallback;
  return Pos{mark.line + 1, mark.column + 1};
}

std::string child_path(std::string_view parent, std::string_view key) {
  if (parent.empty()) return std::string(key);
  std::string out(parent);
  out += '.';
  out += key;
  return out;
}

std::string index_path(std::string_view parent, size_t index) {
  return std::string(parent) + "[" + std::to_string(index) + "]";
}

void ReadContext::report(std::string_view path, Pos pos, std::string message) {
  problems_.push_back(TopologyProblem{file_, pos.line, pos.column, std::move(message)});
  broken_paths_.emplace_back(path);
}

Pos ReadContext::where(std::string_view path) const {
  std::string_view p = path;
  while (!p.empty()) {
    if (auto it = positions_.find(p); it != positions_.end()) return it->second;
    const size_t cut = p.find_last_of(".[");
    if (cut == std::string_view::npos) break;
    p = p.substr(0, cut);
  }
  return {};
}

std::optional<Pos> ReadContext::find(std::string_view path) const {
  if (auto it = positions_.find(path); it != positions_.end()) return it->second;
  return std::nullopt;
}

bool ReadContext::broken(std::string_view path) const {
  return std::any_of(broken_paths_.begin(), broken_paths_.end(),
                     [&](const std::string& b) { return related(b, path); });
}

std::vector<TopologyProblem> ReadContext::take_problems() {
  std::stable_sort(problems_.begin(), problems_.end(),
                   [](const TopologyProblem& a, const TopologyProblem& b) {
                     return std::pair(a.line, a.column) < std::pair(b.line, b.column);
                   });
  return std::move(problems_);
}

std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Undefined:
      return "nothing";
    case YAML::NodeType::Null:
      return "null (an empty value)";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Scalar:
      return quoted(node.Scalar());
  }
  return "something else";
}

MapReader::MapReader(const YAML::Node& map, std::string path, std::initializer_list<std::string_view> allowed,
                     ReadContext& ctx)
    : path_(std::move(path)), pos_(pos_of(map)), ctx_(ctx) {
  const std::string where = path_.empty() ? std::string("at the top level") : "in " + path_;
  // Copies, not references: yaml-cpp's iterator-> hands out a temporary proxy.
  for (const auto& entry : map) {
    const YAML::Node key = entry.first;
    const YAML::Node value = entry.second;
    const Pos key_pos = pos_of(key, pos_);
    if (!key.IsScalar()) {
      ctx_.report(path_, key_pos, "a key " + where + " must be a name, got " + describe(key));
      continue;
    }
    const std::string name = key.Scalar();
    if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
      std::string message = "unknown key '" + name + "' " + where;
      if (auto suggestion = closest_match(name, allowed)) {
        message += " (did you mean '" + std::string(*suggestion) + "'?)";
      } else {
        message += " (allowed: " + join(allowed) + ")";
      }
      ctx_.report(field(name), key_pos, std::move(message));
      continue;
    }
    const bool seen =
        std::any_of(entries_.begin(), entries_.end(), [&](const auto& e) { return e.first == name; });
    if (seen) {
      // yaml-cpp keeps both; silently taking either would hide an edit gone wrong.
      ctx_.report(field(name), key_pos, "duplicate key '" + name + "' " + where);
      continue;
    }
    ctx_.remember(field(name), pos_of(value, key_pos));
    entries_.emplace_back(name, value);
  }
}

std::optional<YAML::Node> MapReader::get(std::string_view key) const {
  for (const auto& [name, value] : entries_) {
    if (name == key) return value;
  }
  return std::nullopt;
}

std::optional<YAML::Node> MapReader::require(std::string_view key) const {
  auto value = get(key);
  if (!value) {
    const std::string message = "missing required key '" + std::string(key) + "'";
    ctx_.report(field(key), pos_, path_.empty() ? message + " at the top level" : path_ + ": " + message);
  }
  return value;
}

bool expect_map(const YAML::Node& node, std::string_view path, Pos fallback, ReadContext& ctx) {
  if (node.IsMap()) return true;
  ctx.report(path, pos_of(node, fallback), std::string(path) + ": expected a map, got " + describe(node));
  return false;
}

bool expect_list(const YAML::Node& node, std::string_view path, Pos fallback, ReadContext& ctx) {
  if (node.IsSequence()) return true;
  ctx.report(path, pos_of(node, fallback), std::string(path) + ": expected a list, got " + describe(node));
  return false;
}

std::optional<std::string> read_string(const YAML::Node& node, const std::string& path, Pos fallback,
                                       ReadContext& ctx) {
  const Pos pos = ctx.find(path).value_or(pos_of(node, fallback));
  ctx.remember(path, pos);
  if (!node.IsScalar() || node.Scalar().empty()) {
    ctx.report(path, pos, path + ": expected a non-empty string, got " + describe(node));
    return std::nullopt;
  }
  return node.Scalar();
}

std::optional<int64_t> read_int(const YAML::Node& node, const std::string& path, int64_t min, int64_t max,
                                Pos fallback, ReadContext& ctx) {
  const Pos pos = ctx.find(path).value_or(pos_of(node, fallback));
  ctx.remember(path, pos);
  if (node.IsScalar()) {
    const std::string& text = node.Scalar();
    int64_t value = 0;
    const auto [rest, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec == std::errc() && rest == text.data() + text.size() && !text.empty() && value >= min &&
        value <= max) {
      return value;
    }
  }
  ctx.report(path, pos,
             path + ": expected an integer " + std::to_string(min) + ".." + std::to_string(max) + ", got " +
                 describe(node));
  return std::nullopt;
}

std::optional<uint64_t> read_size(const YAML::Node& node, const std::string& path, Pos fallback,
                                  ReadContext& ctx) {
  const Pos pos = ctx.find(path).value_or(pos_of(node, fallback));
  ctx.remember(path, pos);
  if (!node.IsScalar()) {
    ctx.report(path, pos,
               path + ": expected a size like 64GiB, 512MiB or a byte count, got " + describe(node));
    return std::nullopt;
  }
  auto parsed = parse_size(node.Scalar());
  if (auto* why = std::get_if<std::string>(&parsed)) {
    ctx.report(path, pos, path + ": bad size " + describe(node) + ": " + *why);
    return std::nullopt;
  }
  return std::get<uint64_t>(parsed);
}

std::optional<size_t> read_choice(const YAML::Node& node, const std::string& path,
                                  std::initializer_list<std::string_view> choices, Pos fallback,
                                  ReadContext& ctx) {
  const Pos pos = ctx.find(path).value_or(pos_of(node, fallback));
  ctx.remember(path, pos);
  if (node.IsScalar()) {
    const auto it = std::find(choices.begin(), choices.end(), node.Scalar());
    if (it != choices.end()) return static_cast<size_t>(it - choices.begin());
  }
  std::string message = path + ": expected one of " + join(choices) + ", got " + describe(node);
  if (node.IsScalar()) {
    if (auto suggestion = closest_match(node.Scalar(), choices)) {
      message += " (did you mean '" + std::string(*suggestion) + "'?)";
    }
  }
  ctx.report(path, pos, std::move(message));
  return std::nullopt;
}

}  // namespace kvf::fabric::topo
