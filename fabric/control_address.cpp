// Host:port text as operators write it in flags and topology files, and back.
#include <charconv>

#include "kvf/fabric/control_channel.h"

namespace kvf::fabric {

Result<std::pair<std::string, uint16_t>> parse_host_port(std::string_view text) {
  const std::string quoted = "'" + std::string(text) + "'";
  std::string_view host;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) {
      return Status(ErrorCode::kInvalidArgument, "address " + quoted + " has '[' without ']'");
    }
    host = text.substr(1, close - 1);
    const std::string_view rest = text.substr(close + 1);
    if (rest.empty() || rest.front() != ':') {
      return Status(ErrorCode::kInvalidArgument, "address " + quoted + " has no port (expected [host]:port)");
    }
    port_text = rest.substr(1);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) {
      return Status(ErrorCode::kInvalidArgument, "address " + quoted + " has no port (expected host:port)");
    }
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      // "::1:7000" is ambiguous: the port could be part of the address.
      return Status(ErrorCode::kInvalidArgument,
                    "address " + quoted + ": an IPv6 address needs brackets, as in [::1]:7000");
    }
  }
  if (host.empty()) return Status(ErrorCode::kInvalidArgument, "address " + quoted + " has an empty host");
  if (port_text.empty())
    return Status(ErrorCode::kInvalidArgument, "address " + quoted + " has an empty port");
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), value);
  if (ec != std::errc() || end != port_text.data() + port_text.size() || value > 65535) {
    return Status(ErrorCode::kInvalidArgument, "address " + quoted + ": port '" + std::string(port_text) +
                                                   "' is not a number in 0..65535");
  }
  return std::pair<std::string, uint16_t>(std::string(host), static_cast<uint16_t>(value));
}

std::string endpoint_to_string(const boost::asio::ip::tcp::endpoint& endpoint) {
  const auto address = endpoint.address();
  const std::string host = address.is_v6() ? "[" + address.to_string() + "]" : address.to_string();
  return host + ":" + std::to_string(endpoint.port());
}

}  // namespace kvf::fabric
