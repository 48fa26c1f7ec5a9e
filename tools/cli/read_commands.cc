// `cowtap dump` and `cowtap read`: guest bytes to standard output, streamed
// in 1 MiB chunks so that any image size runs in constant memory. Binary
// output is refused on a terminal (redirect it, or use read --hex), except
// for a short `read`.
#include <fmt/format.h>
#include <unistd.h>

#include <vector>

#include "base/checked_math.h"
#include "tools/cli/command.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

constexpr uint64_t kChunkBytes = uint64_t{1} << 20;
// `read` prints short ranges even on a terminal (a label, a sector header);
// longer binary output there is refused like `dump`'s.
constexpr uint64_t kMaxTerminalReadBytes = 4096;

Status RefuseTerminal() {
  if (::isatty(STDOUT_FILENO))
    return Status::InvalidArgument(
        "refusing to write binary data to a terminal; redirect standard output to a file or a pipe");
  return Status::Ok();
}

// Reads [offset, offset + length) of image and hands each chunk to sink.
template <typename Sink>
Status StreamRange(cow::Image& image, uint64_t offset, uint64_t length, Sink&& sink) {
  std::vector<uint8_t> buf(static_cast<size_t>(std::min(kChunkBytes, length)));
  while (length > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kChunkBytes, length));
    const iovec iov = MakeIoVec(buf.data(), n);
    COWTAP_RETURN_IF_ERROR(image.Read(offset, IoVecs(&iov, 1)));
    COWTAP_RETURN_IF_ERROR(sink(offset, std::span<const uint8_t>(buf.data(), n)));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

Status FlushStdout() {
  if (std::fflush(stdout) != 0) return Status::FromErrno(errno, "writing to standard output");
  return Status::Ok();
}

class DumpCommand final : public Command {
 public:
  std::string_view name() const override { return "dump"; }
  std::string_view summary() const override { return "Write all guest bytes of an image to standard output"; }

  void Configure(CLI::App& app) override {
    app.add_option("-l,--snapshot", snapshot_, "Dump this internal snapshot (id or name; qcow2) instead");
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to dump")->required();
    app.footer(
        "Reads through the backing chain (the bytes a guest would see) in 1 MiB chunks.\n"
        "Refuses to write to a terminal. Exit status: 0 success, 1 error.");
  }

  int Run() override {
    cow::OpenOptions o = CliOpenOptions(/*read_only=*/true, format_);
    o.snapshot = snapshot_;
    auto opened = cow::OpenImage(image_, o);
    if (!opened.ok()) return ReportError(name(), image_, opened.status());
    Status s = RefuseTerminal();
    if (s.ok()) {
      s = StreamRange(**opened, 0, (*opened)->size_bytes(),
                      [](uint64_t, std::span<const uint8_t> bytes) { return WriteAll(stdout, bytes); });
    }
    if (s.ok()) s = FlushStdout();
    if (s.ok()) s = (*opened)->Close();
    if (!s.ok()) return ReportError(name(), image_, s);
    return 0;
  }

 private:
  std::string snapshot_;
  std::string format_;
  std::string image_;
};

class ReadCommand final : public Command {
 public:
  std::string_view name() const override { return "read"; }
  std::string_view summary() const override { return "Write a range of guest bytes to standard output"; }

  void Configure(CLI::App& app) override {
    app.add_flag("--hex", hex_, "Print a hexdump (offset, 16 bytes in hex, ASCII) instead of raw bytes");
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to read")->required();
    app.add_option("OFFSET", offset_, "Guest byte offset (K/M/G suffixes allowed)")->required();
    app.add_option("LENGTH", length_, "Number of bytes (K/M/G suffixes allowed)")->required();
    app.footer(
        "More than 4 KiB of raw bytes are refused on a terminal (use --hex or redirect).\n"
        "Exit status: 0 success, 1 error.");
  }

  int Run() override {
    auto offset = ParseSize(offset_);
    if (!offset.ok()) return ReportError(name(), image_, offset.status().Annotate("OFFSET"));
    auto length = ParseSize(length_);
    if (!length.ok()) return ReportError(name(), image_, length.status().Annotate("LENGTH"));
    auto opened = cow::OpenImage(image_, CliOpenOptions(/*read_only=*/true, format_));
    if (!opened.ok()) return ReportError(name(), image_, opened.status());
    cow::Image& image = **opened;
    if (!RangeWithin(*offset, *length, image.size_bytes()))
      return ReportError(name(), image_,
                         Status::OutOfRange(fmt::format("range {}+{} is beyond the image size {}", *offset, *length,
                                                        image.size_bytes())));
    Status s = hex_ || *length <= kMaxTerminalReadBytes ? Status::Ok() : RefuseTerminal();
    if (s.ok()) {
      s = StreamRange(image, *offset, *length, [this](uint64_t at, std::span<const uint8_t> bytes) {
        if (!hex_) return WriteAll(stdout, bytes);
        std::string text;
        for (size_t i = 0; i < bytes.size(); i += 16) {
          text += HexDumpLine(at + i, bytes.subspan(i, std::min<size_t>(16, bytes.size() - i)));
          text += '\n';
        }
        return WriteAll(stdout, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
      });
    }
    if (s.ok()) s = FlushStdout();
    if (s.ok()) s = image.Close();
    if (!s.ok()) return ReportError(name(), image_, s);
    return 0;
  }

 private:
  bool hex_ = false;
  std::string format_;
  std::string image_;
  std::string offset_;
  std::string length_;
};

}  // namespace

std::unique_ptr<Command> NewDumpCommand() { return std::make_unique<DumpCommand>(); }
std::unique_ptr<Command> NewReadCommand() { return std::make_unique<ReadCommand>(); }

}  // namespace cowtap::cli
