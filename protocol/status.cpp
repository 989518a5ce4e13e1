#include "kvf/protocol/status.h"

namespace kvf {

std::string_view error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk: return "ok";
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kMalformed: return "malformed";
    case ErrorCode::kUnsupportedVersion: return "unsupported_version";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kPeerLost: return "peer_lost";
    case ErrorCode::kTransportError: return "transport_error";
    case ErrorCode::kOutOfMemory: return "out_of_memory";
    case ErrorCode::kNotFound: return "not_found";
    case ErrorCode::kAborted: return "aborted";
    case ErrorCode::kAuthFailed: return "auth_failed";
    case ErrorCode::kVerifyFailed: return "verify_failed";
    case ErrorCode::kInternal: return "internal";
    case ErrorCode::kUnavailable: return "unavailable";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (ok()) return "ok";
  std::string s(error_code_name(code_));
  if (!message_.empty()) {
    s += ": ";
    s += message_;
  }
  return s;
}

}  // namespace kvf
