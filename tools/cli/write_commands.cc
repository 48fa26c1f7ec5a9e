// `cowtap write`, `cowtap zero`, `cowtap discard`: change guest bytes of the
// top layer (never a backing image), then flush and close so the change is
// durable when the command returns 0.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "base/checked_math.h"
#include "tools/cli/command.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

constexpr size_t kChunkBytes = size_t{1} << 20;

// Reads up to buf.size() bytes, retrying short reads (pipes) until the
// buffer is full or the input ends. Returns the count read.
Result<size_t> ReadFull(int fd, std::span<uint8_t> buf, const std::string& name) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::read(fd, buf.data() + done, buf.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "reading " + name);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Status RangeCheck(uint64_t offset, uint64_t length, const cow::Image& image) {
  if (!RangeWithin(offset, length, image.size_bytes()))
    return Status::OutOfRange(
        fmt::format("range {}+{} is beyond the image size {}", offset, length, image.size_bytes()));
  return Status::Ok();
}

// Parses OFFSET and LENGTH and opens the image read-write.
struct Target {
  uint64_t offset = 0;
  uint64_t length = 0;
  std::unique_ptr<cow::Image> image;
};
Result<Target> OpenTarget(const std::string& image, const std::string& format, const std::string& offset,
                          const std::string* length) {
  Target t;
  auto o = ParseSize(offset);
  if (!o.ok()) return o.status().Annotate("OFFSET");
  t.offset = *o;
  if (length) {
    auto l = ParseSize(*length);
    if (!l.ok()) return l.status().Annotate("LENGTH");
    t.length = *l;
  }
  COWTAP_ASSIGN_OR_RETURN(t.image, cow::OpenImage(image, CliOpenOptions(/*read_only=*/false, format)));
  return t;
}

Status FlushAndClose(cow::Image& image) {
  COWTAP_RETURN_IF_ERROR(image.Flush());
  return image.Close();
}

class WriteCommand final : public Command {
 public:
  std::string_view name() const override { return "write"; }
  std::string_view summary() const override { return "Write bytes from a file or standard input into an image"; }

  void Configure(CLI::App& app) override {
    app.add_option("--from", from_, "Where the bytes come from: a file, or - for standard input")->required();
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to write into (its top layer)")->required();
    app.add_option("OFFSET", offset_, "Guest byte offset (K/M/G suffixes allowed)")->required();
    app.footer(
        "Writes all of the input at OFFSET; the input must fit inside the image (a regular\n"
        "file is checked before anything is written; standard input chunk by chunk).\n"
        "Flushes before exiting. Exit status: 0 success, 1 error.");
  }

  int Run() override {
    auto target = OpenTarget(image_, format_, offset_, nullptr);
    if (!target.ok()) return ReportError(name(), image_, target.status());
    cow::Image& image = *target->image;
    int fd = STDIN_FILENO;
    const std::string input = from_ == "-" ? "standard input" : from_;
    if (from_ != "-") {
      fd = ::open(from_.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return ReportError(name(), image_, Status::FromErrno(errno, "opening " + from_));
    }
    struct stat st;
    Status s;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
      s = RangeCheck(target->offset, static_cast<uint64_t>(st.st_size), image);
    uint64_t written = 0;
    std::vector<uint8_t> buf(kChunkBytes);
    while (s.ok()) {
      auto n = ReadFull(fd, buf, input);
      if (!n.ok()) {
        s = n.status();
        break;
      }
      if (*n == 0) break;
      const uint64_t at = target->offset + written;  // cannot overflow: RangeCheck bounds it
      s = RangeCheck(target->offset, written + *n, image);
      if (!s.ok()) break;
      const iovec iov = MakeIoVec(buf.data(), *n);
      s = image.Write(at, IoVecs(&iov, 1));
      written += *n;
    }
    if (fd != STDIN_FILENO) ::close(fd);
    if (s.ok()) s = FlushAndClose(image);
    if (!s.ok()) return ReportError(name(), image_, s);
    fmt::print("wrote {} bytes at offset {}\n", written, target->offset);
    return 0;
  }

 private:
  std::string from_;
  std::string format_;
  std::string image_;
  std::string offset_;
};

// zero and discard differ only in the call they make.
class RangeCommand final : public Command {
 public:
  enum class Kind { kZero, kDiscard };
  explicit RangeCommand(Kind kind) : kind_(kind) {}

  std::string_view name() const override { return kind_ == Kind::kZero ? "zero" : "discard"; }
  std::string_view summary() const override {
    return kind_ == Kind::kZero ? "Make a range of an image read as zeros"
                                : "Discard a range of an image (it then reads as zeros)";
  }

  void Configure(CLI::App& app) override {
    if (kind_ == Kind::kZero)
      app.add_flag("--unmap", unmap_, "Allow the space to be released (still reads as zeros, never as backing)");
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to change (its top layer)")->required();
    app.add_option("OFFSET", offset_, "Guest byte offset (K/M/G suffixes allowed)")->required();
    app.add_option("LENGTH", length_, "Number of bytes (K/M/G suffixes allowed)")->required();
    app.footer(kind_ == Kind::kZero ? "Flushes before exiting. Exit status: 0 success, 1 error."
                                    : "Unaligned heads and tails may be left unchanged. Flushes before exiting.\n"
                                      "Exit status: 0 success, 1 error.");
  }

  int Run() override {
    auto target = OpenTarget(image_, format_, offset_, &length_);
    if (!target.ok()) return ReportError(name(), image_, target.status());
    cow::Image& image = *target->image;
    Status s = RangeCheck(target->offset, target->length, image);
    if (s.ok()) {
      s = kind_ == Kind::kZero ? image.WriteZeroes(target->offset, target->length, unmap_)
                               : image.Discard(target->offset, target->length);
    }
    if (s.ok()) s = FlushAndClose(image);
    if (!s.ok()) return ReportError(name(), image_, s);
    fmt::print("{} {} bytes at offset {}\n", kind_ == Kind::kZero ? "zeroed" : "discarded", target->length,
               target->offset);
    return 0;
  }

 private:
  const Kind kind_;
  bool unmap_ = false;
  std::string format_;
  std::string image_;
  std::string offset_;
  std::string length_;
};

}  // namespace

std::unique_ptr<Command> NewWriteCommand() { return std::make_unique<WriteCommand>(); }
std::unique_ptr<Command> NewZeroCommand() { return std::make_unique<RangeCommand>(RangeCommand::Kind::kZero); }
std::unique_ptr<Command> NewDiscardCommand() {
  return std::make_unique<RangeCommand>(RangeCommand::Kind::kDiscard);
}

}  // namespace cowtap::cli
