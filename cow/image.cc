// OpenImage / CreateImage: format probing and backing-chain construction.
// The format modules parse their own headers; this file resolves backing
// names, enforces the depth limit and refuses loops, so no format module has
// to know about chains.
#include "cow/image.h"

#include <condition_variable>
#include <mutex>
#include <set>

#include "base/endian.h"
#include "cow/formats.h"
#include "cow/io_engine.h"

namespace cowtap::cow {

std::string_view FormatName(ImageFormat format) {
  switch (format) {
    case ImageFormat::kRaw: return "raw";
    case ImageFormat::kQcow: return "qcow";
    case ImageFormat::kQcow2: return "qcow2";
  }
  return "unknown";
}

std::optional<ImageFormat> ParseFormatName(std::string_view name) {
  if (name == "raw") return ImageFormat::kRaw;
  if (name == "qcow") return ImageFormat::kQcow;
  if (name == "qcow2") return ImageFormat::kQcow2;
  return std::nullopt;
}

Result<ImageFormat> ProbeFormat(File& file) {
  uint8_t head[8];
  COWTAP_ASSIGN_OR_RETURN(uint64_t size, file.Size());
  if (size < sizeof(head)) return ImageFormat::kRaw;
  COWTAP_RETURN_IF_ERROR(file.ReadAt(0, head));
  if (LoadBe32(head) != 0x514649fb) return ImageFormat::kRaw;  // "QFI\xfb"
  uint32_t version = LoadBe32(head + 4);
  if (version == 1) return ImageFormat::kQcow;
  if (version == 2 || version == 3) return ImageFormat::kQcow2;
  return Status::NotSupported(file.path() + ": qcow image version " + std::to_string(version) +
                              " is not supported (cowtap reads qcow v1 and qcow2 v2/v3)");
}

Status WaitForCompletion(const std::function<void(ImageCompletion)>& start) {
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status status;
  };
  auto state = std::make_shared<State>();
  start([state](Status s) {
    std::lock_guard lock(state->mu);
    state->status = std::move(s);
    state->done = true;
    state->cv.notify_all();
  });
  // A plugged thread holds its submissions back: start them, or this wait
  // would never end.
  if (ThisThreadPlugged()) FlushThisThread();
  std::unique_lock lock(state->mu);
  state->cv.wait(lock, [&] { return state->done; });
  return state->status;
}

namespace {

struct ChainBuilder {
  const OpenOptions& options;
  FileSystem* fs;
  std::set<std::string> seen;  // identities of the images opened so far

  Result<std::unique_ptr<Image>> OpenLayer(const std::string& path, std::optional<ImageFormat> format,
                                           bool read_only, int depth) {
    if (depth > options.max_chain_depth)
      return Status::InvalidArgument(path + ": backing chain is deeper than " +
                                     std::to_string(options.max_chain_depth) + " images");
    std::string id = fs->Identity(path);
    if (!seen.insert(id).second)
      return Status::Corrupt(path + ": backing chain loops (this file is already in the chain)");
    FileOpenOptions fo;
    fo.writable = !read_only;
    fo.direct = options.direct_io && (depth == 0 || !options.buffered_backing);
    COWTAP_ASSIGN_OR_RETURN(auto file, fs->Open(path, fo));
    if (!format) {
      COWTAP_ASSIGN_OR_RETURN(ImageFormat probed, ProbeFormat(*file));
      format = probed;
    }
    OpenOptions layer_options = options;
    layer_options.read_only = read_only;
    layer_options.format = format;
    if (depth > 0) layer_options.snapshot.clear();
    BackingOpener open_backing = [this, path, depth](const BackingRef& ref) -> Result<std::shared_ptr<Image>> {
      if (ref.name.empty()) return Status::InvalidArgument(path + ": empty backing file name");
      std::string backing_path = ResolveRelativePath(path, ref.name);
      auto r = OpenLayer(backing_path, ref.format, /*read_only=*/true, depth + 1);
      if (!r.ok()) return r.status().Annotate("opening backing file of " + path);
      return std::shared_ptr<Image>(std::move(r).value());
    };
    Result<std::unique_ptr<Image>> image = Status::Internal("unreachable");
    switch (*format) {
      case ImageFormat::kRaw: image = OpenRawImage(std::move(file), path, layer_options); break;
      case ImageFormat::kQcow: image = OpenQcowImage(std::move(file), path, layer_options, open_backing); break;
      case ImageFormat::kQcow2: image = OpenQcow2Image(std::move(file), path, layer_options, open_backing); break;
    }
    return image;
  }
};

}  // namespace

Result<std::unique_ptr<Image>> OpenImage(const std::string& path, const OpenOptions& options) {
  ChainBuilder builder{options, options.fs ? options.fs : DefaultFileSystem(), {}};
  bool read_only = options.read_only || !options.snapshot.empty();
  return builder.OpenLayer(path, options.format, read_only, 0);
}

Status CreateImage(const std::string& path, const CreateOptions& options) {
  CreateOptions resolved = options;
  FileSystem* fs = options.fs ? options.fs : DefaultFileSystem();
  resolved.fs = fs;
  if (!options.overwrite && fs->Exists(path))
    return Status::Busy(path + ": file exists (pass overwrite to replace it)");
  if (!options.backing_file.empty()) {
    std::string backing_path = ResolveRelativePath(path, options.backing_file);
    OpenOptions oo;
    oo.read_only = true;
    oo.fs = fs;
    oo.format = options.backing_format;
    oo.remap_cache_entries = 0;
    auto backing = OpenImage(backing_path, oo);
    if (!backing.ok()) return backing.status().Annotate("creating " + path + " over backing file");
    if (resolved.size_bytes == 0) resolved.size_bytes = (*backing)->size_bytes();
    if (!resolved.backing_format) resolved.backing_format = (*backing)->info().format;
  } else if (resolved.size_bytes == 0 && options.format != ImageFormat::kRaw) {
    return Status::InvalidArgument(path + ": give a size or a backing file");
  }
  switch (options.format) {
    case ImageFormat::kRaw: return CreateRawImage(path, resolved, fs);
    case ImageFormat::kQcow: return CreateQcowImage(path, resolved, fs);
    case ImageFormat::kQcow2: return CreateQcow2Image(path, resolved, fs);
  }
  return Status::InvalidArgument("unknown image format");
}

}  // namespace cowtap::cow
