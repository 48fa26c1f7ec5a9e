#include "base/status.h"

#include <cstring>

namespace cowtap {

std::string_view ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk: return "OK";
    case ErrorCode::kInvalidArgument: return "Invalid argument";
    case ErrorCode::kNotSupported: return "Not supported";
    case ErrorCode::kCorrupt: return "Corrupt";
    case ErrorCode::kIoError: return "I/O error";
    case ErrorCode::kNoSpace: return "No space";
    case ErrorCode::kOutOfRange: return "Out of range";
    case ErrorCode::kReadOnly: return "Read-only";
    case ErrorCode::kNotFound: return "Not found";
    case ErrorCode::kBusy: return "Busy";
    case ErrorCode::kInternal: return "Internal error";
    case ErrorCode::kCancelled: return "Cancelled";
  }
  return "Unknown error";
}

Status Status::FromErrno(int errno_value, std::string_view what) {
  ErrorCode code = ErrorCode::kIoError;
  switch (errno_value) {
    case ENOSPC:
    case EDQUOT: code = ErrorCode::kNoSpace; break;
    case ENOENT: code = ErrorCode::kNotFound; break;
    case EROFS:
    case EACCES:
    case EPERM: code = ErrorCode::kReadOnly; break;
    case EINVAL: code = ErrorCode::kInvalidArgument; break;
    case EOPNOTSUPP: code = ErrorCode::kNotSupported; break;
    case EAGAIN:
    case EBUSY: code = ErrorCode::kBusy; break;
    case ECANCELED: code = ErrorCode::kCancelled; break;
    default: break;
  }
  std::string msg(what);
  msg += ": ";
  msg += std::strerror(errno_value);
  return Status(code, std::move(msg), errno_value);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(ErrorCodeName(code_));
  s += ": ";
  s += message_;
  return s;
}

Status Status::Annotate(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  m += ": ";
  m += message_;
  return Status(code_, std::move(m), errno_);
}

}  // namespace cowtap
