// Status and Result<T>: the error channel of every fallible path.
//
// A Status is either OK or carries an ErrorCode, the errno it came from (if
// any) and a message that says what failed, on what, and what to do. OK
// statuses carry no allocation. Result<T> holds either a T or a non-OK Status.
// Both are values; neither is thread-safe to mutate from two threads at once.
#pragma once

#include <cerrno>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace cowtap {

enum class ErrorCode : uint8_t {
  kOk = 0,
  kInvalidArgument,  // a caller's (or guest's) request is malformed
  kNotSupported,     // a feature or operation this build does not implement
  kCorrupt,          // on-disk metadata violates the format
  kIoError,          // the underlying storage failed
  kNoSpace,          // ENOSPC / EDQUOT
  kOutOfRange,       // offset or length beyond the device or a table
  kReadOnly,         // a write to something opened or marked read-only
  kNotFound,
  kBusy,             // locked or in use by someone else
  kInternal,         // a bug in cowtap
  kCancelled,        // torn down before completion
};

std::string_view ErrorCodeName(ErrorCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(ErrorCode code, std::string message, int errno_value = 0)
      : code_(code), errno_(errno_value), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {ErrorCode::kInvalidArgument, std::move(m)}; }
  static Status NotSupported(std::string m) { return {ErrorCode::kNotSupported, std::move(m)}; }
  static Status Corrupt(std::string m) { return {ErrorCode::kCorrupt, std::move(m)}; }
  static Status IoError(std::string m) { return {ErrorCode::kIoError, std::move(m)}; }
  static Status NoSpace(std::string m) { return {ErrorCode::kNoSpace, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {ErrorCode::kOutOfRange, std::move(m)}; }
  static Status ReadOnly(std::string m) { return {ErrorCode::kReadOnly, std::move(m)}; }
  static Status NotFound(std::string m) { return {ErrorCode::kNotFound, std::move(m)}; }
  static Status Busy(std::string m) { return {ErrorCode::kBusy, std::move(m)}; }
  static Status Internal(std::string m) { return {ErrorCode::kInternal, std::move(m)}; }
  static Status Cancelled(std::string m) { return {ErrorCode::kCancelled, std::move(m)}; }
  // Maps an errno to the matching code; the message becomes "what: strerror".
  static Status FromErrno(int errno_value, std::string_view what);

  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  int errno_value() const { return errno_; }
  const std::string& message() const { return message_; }
  // "Corrupt: <message>" or "OK".
  std::string ToString() const;
  // Returns a copy whose message is prefixed by context ("context: message").
  Status Annotate(std::string_view context) const;

  // Marks a Status as deliberately dropped (e.g. best-effort cleanup).
  void IgnoreError() const {}

 private:
  ErrorCode code_ = ErrorCode::kOk;
  int errno_ = 0;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status::Internal("Result constructed from an OK Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  // REQUIRES: ok().
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &std::get<T>(v_); }
  const T* operator->() const { return &std::get<T>(v_); }

 private:
  std::variant<T, Status> v_;
};

#define COWTAP_CONCAT_INNER_(a, b) a##b
#define COWTAP_CONCAT_(a, b) COWTAP_CONCAT_INNER_(a, b)

#define COWTAP_RETURN_IF_ERROR(expr)            \
  do {                                          \
    ::cowtap::Status cowtap_status_ = (expr);   \
    if (!cowtap_status_.ok()) return cowtap_status_; \
  } while (0)

#define COWTAP_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

// COWTAP_ASSIGN_OR_RETURN(auto x, Foo()); or (x, Foo()) for an existing x.
#define COWTAP_ASSIGN_OR_RETURN(lhs, expr) \
  COWTAP_ASSIGN_OR_RETURN_IMPL_(COWTAP_CONCAT_(cowtap_result_, __LINE__), lhs, expr)

}  // namespace cowtap
