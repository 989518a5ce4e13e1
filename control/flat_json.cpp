// scan_flat_object: a single pass over the bytes with no allocation beyond the result. Every branch
// that meets something outside the narrow grammar gives up (nullopt) rather than guess; the full
// parser then decides. JSON's whitespace is exactly space, tab, newline and carriage return.
#include "flat_json.h"

#include <cstdint>

namespace kvf::control {
namespace {

class Scanner {
 public:
  explicit Scanner(std::string_view text) : p_(text.data()), end_(text.data() + text.size()) {}

  // The next significant byte, or '\0' at the end (a NUL byte in the body is never valid JSON
  // outside strings, so it cannot be mistaken for one).
  char peek() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
    return p_ < end_ ? *p_ : '\0';
  }
  bool eat(char c) {
    if (peek() != c) return false;
    ++p_;
    return true;
  }
  bool at_end() { return peek() == '\0' && p_ == end_; }

  // A string of printable ASCII with no escapes: its bytes are its value.
  bool plain_string(std::string_view& out) {
    if (!eat('"')) return false;
    const char* start = p_;
    for (; p_ < end_; ++p_) {
      const auto c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        out = std::string_view(start, static_cast<size_t>(p_ - start));
        ++p_;
        return true;
      }
      if (c < 0x20 || c > 0x7e || c == '\\') return false;
    }
    return false;
  }

  // An integer 0..2^32-1 in JSON's grammar (no sign, no leading zero, no fraction or exponent).
  bool uint32(uint32_t& out) {
    const char first = peek();
    if (first < '0' || first > '9') return false;
    uint64_t value = 0;
    if (first == '0') {
      ++p_;
    } else {
      int digits = 0;
      for (; p_ < end_ && *p_ >= '0' && *p_ <= '9'; ++p_) {
        if (++digits > 10) return false;
        value = value * 10 + static_cast<uint64_t>(*p_ - '0');
      }
      if (value > UINT32_MAX) return false;
    }
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E' || (*p_ >= '0' && *p_ <= '9'))) return false;
    out = static_cast<uint32_t>(value);
    return true;
  }

  bool word(std::string_view text) {
    peek();
    if (static_cast<size_t>(end_ - p_) < text.size() || std::string_view(p_, text.size()) != text)
      return false;
    p_ += text.size();
    return true;
  }

  bool value(FlatValue& out) {
    switch (peek()) {
      case '"':
        out.kind = FlatValue::Kind::kString;
        return plain_string(out.text);
      case 't':
        out.kind = FlatValue::Kind::kBool;
        out.flag = true;
        return word("true");
      case 'f':
        out.kind = FlatValue::Kind::kBool;
        out.flag = false;
        return word("false");
      case '[':
        ++p_;
        return array(out);
      default:
        return false;
    }
  }

  // After '[': all strings or all integers.
  bool array(FlatValue& out) {
    if (eat(']')) {
      out.kind = FlatValue::Kind::kEmptyArray;
      return true;
    }
    if (peek() == '"') {
      out.kind = FlatValue::Kind::kStrings;
      for (;;) {
        std::string_view item;
        if (!plain_string(item)) return false;
        out.strings.push_back(item);
        if (eat(']')) return true;
        if (!eat(',')) return false;
      }
    }
    out.kind = FlatValue::Kind::kUints;
    // Token arrays are long; a guess from the bytes left saves most reallocations.
    out.uints.reserve(static_cast<size_t>(end_ - p_) / 4);
    for (;;) {
      uint32_t item = 0;
      if (!uint32(item)) return false;
      out.uints.push_back(item);
      if (eat(']')) return true;
      if (!eat(',')) return false;
    }
  }

 private:
  const char* p_;
  const char* end_;
};

}  // namespace

std::optional<std::vector<FlatField>> scan_flat_object(std::string_view body) {
  Scanner scan(body);
  std::vector<FlatField> fields;
  if (!scan.eat('{')) return std::nullopt;
  if (!scan.eat('}')) {
    for (;;) {
      FlatField field;
      if (!scan.plain_string(field.name) || !scan.eat(':') || !scan.value(field.value)) return std::nullopt;
      fields.push_back(std::move(field));
      if (scan.eat('}')) break;
      if (!scan.eat(',')) return std::nullopt;
    }
  }
  if (!scan.at_end()) return std::nullopt;
  return fields;
}

}  // namespace kvf::control
