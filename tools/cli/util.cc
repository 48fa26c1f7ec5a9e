#include "tools/cli/util.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cstring>

#include "base/checked_math.h"

namespace cowtap::cli {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

Result<uint64_t> ParseNumberOption(std::string_view key, std::string_view value) {
  auto v = ParseSize(value);
  if (!v.ok()) return Status::InvalidArgument(fmt::format("-o {}: {}", key, v.status().message()));
  return *v;
}

}  // namespace

Result<uint64_t> ParseSize(std::string_view text) {
  const std::string original(text);
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument(fmt::format("invalid size '{}': {} (use a number of bytes, optionally "
                                               "with a K, M, G, T, P or E suffix)",
                                               original, why));
  };
  if (text.empty()) return bad("empty");
  int base = 10;
  if (text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
    base = 16;
    text.remove_prefix(2);
  }
  uint64_t value = 0;
  size_t digits = 0;
  while (digits < text.size()) {
    const char c = text[digits];
    int d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (base == 16 && std::isxdigit(static_cast<unsigned char>(c))) {
      d = std::tolower(static_cast<unsigned char>(c)) - 'a' + 10;
    } else {
      break;
    }
    if (!CheckedMul<uint64_t>(value, static_cast<uint64_t>(base), &value) ||
        !CheckedAdd<uint64_t>(value, static_cast<uint64_t>(d), &value))
      return bad("too large");
    ++digits;
  }
  if (digits == 0) return bad("no digits");
  std::string suffix = Lower(text.substr(digits));
  if (suffix.size() > 1 && suffix != "b") {
    if (suffix.ends_with("ib")) {
      suffix.resize(suffix.size() - 2);
    } else if (suffix.ends_with("b")) {
      suffix.resize(suffix.size() - 1);
    }
  }
  int shift;
  if (suffix.empty() || suffix == "b") {
    shift = 0;
  } else if (suffix.size() == 1 && std::strchr("kmgtpe", suffix[0])) {
    shift = 10 * (1 + static_cast<int>(std::strchr("kmgtpe", suffix[0]) - "kmgtpe"));
  } else {
    return bad("unknown suffix");
  }
  if (shift && value > (~uint64_t{0} >> shift)) return bad("too large");
  return value << shift;
}

std::string FormatHumanSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  double v = static_cast<double>(bytes);
  while (v >= 1024.0 && unit < 6) {
    v /= 1024.0;
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  std::string s = fmt::format("{:.2f}", v);
  // "4.00" -> "4", "1.50" -> "1.5", as qemu-img prints sizes.
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s + " " + kUnits[unit];
}

Result<bool> ParseBool(std::string_view key, std::string_view value) {
  const std::string v = Lower(value);
  if (v == "on" || v == "true" || v == "yes" || v == "1") return true;
  if (v == "off" || v == "false" || v == "no" || v == "0") return false;
  return Status::InvalidArgument(fmt::format("-o {}: '{}' is not on or off", key, value));
}

Status ApplyCreateOptions(std::string_view list, cow::CreateOptions* options) {
  while (!list.empty()) {
    const size_t comma = list.find(',');
    std::string_view item = list.substr(0, comma);
    list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos)
      return Status::InvalidArgument(fmt::format("-o {}: expected key=value", item));
    const std::string_view key = item.substr(0, eq);
    const std::string_view value = item.substr(eq + 1);
    if (key == "cluster_size") {
      COWTAP_ASSIGN_OR_RETURN(uint64_t v, ParseNumberOption(key, value));
      if (v < 512 || v > (2u << 20) || !IsPowerOfTwo(v))
        return Status::InvalidArgument(
            fmt::format("-o cluster_size: {} is not a power of two between 512 and 2M", value));
      options->cluster_size = static_cast<uint32_t>(v);
    } else if (key == "refcount_bits") {
      COWTAP_ASSIGN_OR_RETURN(uint64_t v, ParseNumberOption(key, value));
      if (v < 1 || v > 64 || !IsPowerOfTwo(v))
        return Status::InvalidArgument(
            fmt::format("-o refcount_bits: {} is not a power of two between 1 and 64", value));
      options->refcount_bits = static_cast<int>(v);
    } else if (key == "compat") {
      if (value == "0.10" || value == "v2") {
        options->qcow2_version = 2;
      } else if (value == "1.1" || value == "v3") {
        options->qcow2_version = 3;
      } else {
        return Status::InvalidArgument(fmt::format("-o compat: '{}' is not 0.10 or 1.1", value));
      }
    } else if (key == "lazy_refcounts") {
      COWTAP_ASSIGN_OR_RETURN(options->lazy_refcounts, ParseBool(key, value));
    } else if (key == "extended_l2") {
      COWTAP_ASSIGN_OR_RETURN(options->extended_l2, ParseBool(key, value));
    } else if (key == "data_file_raw") {
      COWTAP_ASSIGN_OR_RETURN(options->data_file_raw, ParseBool(key, value));
    } else if (key == "compression_type") {
      if (value != "zlib" && value != "zstd")
        return Status::InvalidArgument(fmt::format("-o compression_type: '{}' is not zlib or zstd", value));
      options->compression_type = std::string(value);
    } else if (key == "data_file") {
      options->data_file = std::string(value);
    } else if (key == "backing_file") {
      options->backing_file = std::string(value);
    } else if (key == "backing_fmt") {
      auto f = cow::ParseFormatName(value);
      if (!f) return Status::InvalidArgument(fmt::format("-o backing_fmt: unknown format '{}'", value));
      options->backing_format = *f;
    } else {
      return Status::InvalidArgument(fmt::format(
          "-o: unknown option '{}' (known: cluster_size, refcount_bits, compat, lazy_refcounts, extended_l2, "
          "compression_type, data_file, data_file_raw, backing_file, backing_fmt)",
          key));
    }
  }
  return Status::Ok();
}

std::string HexDumpLine(uint64_t offset, std::span<const uint8_t> bytes) {
  std::string line = fmt::format("{:08x} ", offset);
  for (size_t i = 0; i < 16; ++i) {
    if (i == 8) line += ' ';
    if (i < bytes.size()) {
      line += fmt::format(" {:02x}", bytes[i]);
    } else {
      line += "   ";
    }
  }
  line += "  |";
  for (size_t i = 0; i < bytes.size() && i < 16; ++i)
    line += (bytes[i] >= 0x20 && bytes[i] < 0x7f) ? static_cast<char>(bytes[i]) : '.';
  line += '|';
  return line;
}

std::string ErrorText(const Status& status, std::string_view file) {
  std::string_view msg = status.message();
  if (!file.empty() && msg.size() > file.size() + 2 && msg.substr(0, file.size()) == file &&
      msg.substr(file.size(), 2) == ": ")
    msg.remove_prefix(file.size() + 2);
  if (msg.empty()) return std::string(ErrorCodeName(status.code()));
  return std::string(msg);
}

int ReportError(std::string_view command, std::string_view file, const Status& status) {
  if (file.empty()) {
    fmt::print(stderr, "cowtap {}: {}\n", command, ErrorText(status, file));
  } else {
    fmt::print(stderr, "cowtap {}: {}: {}\n", command, file, ErrorText(status, file));
  }
  return 1;
}

Status WriteAll(std::FILE* out, std::span<const uint8_t> data) {
  if (data.empty()) return Status::Ok();
  if (std::fwrite(data.data(), 1, data.size(), out) != data.size())
    return Status::FromErrno(errno, "writing to standard output");
  return Status::Ok();
}

std::optional<uint64_t> DiskUsageBytes(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace cowtap::cli
