// Status and Result<T>: how kvfabric reports errors as values.
// Data-path errors travel as Status on completions; exceptions are only for setup/configuration.
// Value types; no shared state, safe to copy between threads.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace kvf {

enum class ErrorCode : uint16_t {
  kOk = 0,
  kInvalidArgument = 1,   // a caller passed something out of range or inconsistent
  kMalformed = 2,         // bytes from a peer or a file did not decode
  kUnsupportedVersion = 3,
  kTimeout = 4,
  kPeerLost = 5,          // the peer closed, crashed or became unreachable
  kTransportError = 6,    // the transport (UCX, ...) reported a failure
  kOutOfMemory = 7,
  kNotFound = 8,
  kAborted = 9,           // cancelled by a local or remote abort
  kAuthFailed = 10,
  kVerifyFailed = 11,     // bytes arrived but did not match what was sent
  kInternal = 12,
  kUnavailable = 13,      // a resource this machine does not have (no GPU, no RDMA device, built without it)
};

std::string_view error_code_name(ErrorCode code);

class Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }

  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "peer_lost: connection reset by 10.0.0.2:7100"
  std::string to_string() const;

 private:
  ErrorCode code_ = ErrorCode::kOk;
  std::string message_;
};

// Either a value or a non-ok Status.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}                 // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}          // NOLINT: implicit by design
  Result(ErrorCode code, std::string message) : v_(Status(code, std::move(message))) {}

  bool ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace kvf
