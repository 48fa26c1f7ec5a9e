// Parsing and formatting helpers shared by the `cowtap` image commands:
// sizes with K/M/G/T suffixes, qemu-img style "-o key=value,..." creation
// options, human-readable sizes, hexdump lines, and the one place that turns
// a Status into the CLI's error line. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "base/status.h"
#include "cow/image.h"

namespace cowtap::cli {

// Parses a byte count: decimal or 0x-hex digits, optionally followed by a
// binary suffix K, M, G, T, P or E (any case, optionally "iB" or "B" after
// it; "B" alone means bytes). Fails with kInvalidArgument on anything else,
// including negative numbers and values that do not fit in 64 bits.
Result<uint64_t> ParseSize(std::string_view text);

// "4 MiB", "1.5 GiB", "512 B": the largest binary unit, two decimals at most.
std::string FormatHumanSize(uint64_t bytes);

// Parses "on/off/true/false/yes/no/1/0".
Result<bool> ParseBool(std::string_view key, std::string_view value);

// Applies one comma-separated list of qemu-img creation options (cluster_size,
// refcount_bits, compat, lazy_refcounts, extended_l2, compression_type,
// data_file, data_file_raw, backing_file, backing_fmt) to *options. Unknown
// keys and bad values fail with kInvalidArgument naming the key.
Status ApplyCreateOptions(std::string_view list, cow::CreateOptions* options);

// One `hexdump -C` style line for up to 16 bytes at the given guest offset,
// without a trailing newline.
std::string HexDumpLine(uint64_t offset, std::span<const uint8_t> bytes);

// The text after "cowtap <command>: <file>: " for a failed status: the
// message, with a leading "<file>: " dropped so the name is not said twice.
std::string ErrorText(const Status& status, std::string_view file);

// Prints "cowtap <command>: <file>: <what>" to stderr and returns 1, the exit
// code of every command that could not do its job. An empty file prints
// "cowtap <command>: <what>".
int ReportError(std::string_view command, std::string_view file, const Status& status);

// Writes all of data to out; kIoError (with errno's text) if the stream fails.
Status WriteAll(std::FILE* out, std::span<const uint8_t> data);

// Bytes the file occupies on disk (st_blocks), or nullopt if it is not a
// local file.
std::optional<uint64_t> DiskUsageBytes(const std::string& path);

}  // namespace cowtap::cli
