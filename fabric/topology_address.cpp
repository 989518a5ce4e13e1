#include "topology_address.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>

namespace kvf::fabric::topo {

namespace {

bool is_ip_literal(const std::string& text, int family) {
  unsigned char buffer[sizeof(struct in6_addr)];
  return inet_pton(family, text.c_str(), buffer) == 1;
}

// RFC 1123: dot-separated labels of letters, digits and inner hyphens, 1..63 each, 253 in all.
bool is_host_name(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  size_t start = 0;
  while (start <= name.size()) {
    const size_t end = std::min(name.find('.', start), name.size());
    const std::string_view label = name.substr(start, end - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') return false;
    const bool ok = std::all_of(label.begin(), label.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '-';
    });
    if (!ok) return false;
    start = end + 1;
  }
  return true;
}

}  // namespace

std::optional<std::string> address_problem(std::string_view address) {
  const std::string text(address);
  if (text.find('/') != std::string::npos) {
    return std::string("expected a host name or an IP address, not a URL");
  }
  if (std::count(text.begin(), text.end(), ':') == 1) {
    return std::string("expected a host name or an IP address without a port (ports have their own keys)");
  }
  if (text.find(':') != std::string::npos) {
    if (is_ip_literal(text, AF_INET6)) return std::nullopt;
    return std::string("not a valid IPv6 address (write it without brackets or port)");
  }
  // All digits and dots can only be meant as IPv4; "10.0.0.300" must not pass as a host name.
  const bool dotted = std::all_of(text.begin(), text.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c)) || c == '.';
  });
  if (dotted) {
    if (is_ip_literal(text, AF_INET)) return std::nullopt;
    return std::string("not a valid IPv4 address");
  }
  if (is_host_name(address)) return std::nullopt;
  return std::string("expected a host name or an IP address (no scheme, port or spaces)");
}

}  // namespace kvf::fabric::topo
