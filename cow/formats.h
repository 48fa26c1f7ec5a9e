// The per-format entry points behind OpenImage and CreateImage. Each format
// module implements its own; image.cc chooses among them and builds chains.
// Not for use outside cow/ (callers use OpenImage / CreateImage).
#pragma once

#include <memory>
#include <string>

#include "cow/file.h"
#include "cow/image.h"

namespace cowtap::cow {

// Each opener takes ownership of the already-open file of the top layer. It
// parses and validates the header, then asks open_backing for its backing
// image (if it has one) so the chain is built by image.cc, which tracks depth
// and loops. open_backing is valid only during the call: openers must not
// keep it. path is what the image was opened by (for messages and for
// resolving relative names, which open_backing does).
Result<std::unique_ptr<Image>> OpenRawImage(std::unique_ptr<File> file, const std::string& path,
                                            const OpenOptions& options);
Result<std::unique_ptr<Image>> OpenQcowImage(std::unique_ptr<File> file, const std::string& path,
                                             const OpenOptions& options, const BackingOpener& open_backing);
Result<std::unique_ptr<Image>> OpenQcow2Image(std::unique_ptr<File> file, const std::string& path,
                                              const OpenOptions& options, const BackingOpener& open_backing);

// Each creator writes a new image at path. image.cc has already resolved the
// virtual size (from the backing image when options.size_bytes was 0) and the
// backing format (probed when unset), so options is complete.
Status CreateRawImage(const std::string& path, const CreateOptions& options, FileSystem* fs);
Status CreateQcowImage(const std::string& path, const CreateOptions& options, FileSystem* fs);
Status CreateQcow2Image(const std::string& path, const CreateOptions& options, FileSystem* fs);

}  // namespace cowtap::cow
