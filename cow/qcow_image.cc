// QcowImage: opening, reading, mapping, and the L2 table cache.
#include "cow/qcow_image.h"

#include <spdlog/spdlog.h>

#include <array>

#include "base/checked_math.h"
#include "base/endian.h"
#include "cow/formats.h"

namespace cowtap::cow {

QcowImage::~QcowImage() {
  if (closed_) return;
  Status s = Close();
  if (!s.ok()) spdlog::error("closing {}: {}", info_.path, s.ToString());
}

Status QcowImage::CheckRange(uint64_t offset, uint64_t length, bool write) const {
  if (closed_) return Closed();
  if (write && info_.read_only) return Status::ReadOnly(info_.path + ": image is open read-only");
  if (!RangeWithin(offset, length, info_.size_bytes))
    return Status::OutOfRange(info_.path + ": range " + std::to_string(offset) + "+" + std::to_string(length) +
                              " is beyond the image size " + std::to_string(info_.size_bytes));
  return Status::Ok();
}

Status QcowImage::MarkCorrupt(const Status& s) {
  if (s.code() == ErrorCode::kCorrupt && !corrupt_) {
    corrupt_ = true;
    spdlog::error("{}: metadata is corrupt, refusing further writes: {}", info_.path, s.message());
  }
  return s;
}

Result<std::vector<uint64_t>*> QcowImage::LoadL2Locked(uint64_t l2_offset) {
  if (auto* t = cache_.Find(l2_offset)) return t;
  COWTAP_RETURN_IF_ERROR(EvictIfFullLocked());
  std::vector<uint8_t> raw(h_.l2_table_bytes());
  COWTAP_RETURN_IF_ERROR(file_->ReadAt(l2_offset, raw));
  std::vector<uint64_t> entries(h_.l2_entries());
  for (uint64_t i = 0; i < entries.size(); ++i) entries[i] = LoadBe64(raw.data() + i * 8);
  return cache_.Insert(l2_offset, std::move(entries), /*dirty=*/false);
}

Status QcowImage::EvictIfFullLocked() {
  if (!cache_.Full()) return Status::Ok();
  const uint64_t victim = *cache_.Oldest();
  if (cache_.IsDirty(victim)) COWTAP_RETURN_IF_ERROR(FlushLocked());
  cache_.Erase(victim);
  return Status::Ok();
}

Result<QcowCluster> QcowImage::LookupLocked(uint64_t ci) {
  if (remap_) {
    if (auto hit = remap_->Lookup(ci)) {
      if (hit->flags & Remap::kZero) return QcowCluster{};
      return QcowCluster{QcowCluster::kNormal, hit->host_offset, 0};
    }
  }
  QcowCluster c;
  const uint64_t l1_index = ci >> h_.l2_bits;
  if (l1_index < l1_.size() && l1_[l1_index] != 0) {
    COWTAP_ASSIGN_OR_RETURN(auto* table, LoadL2Locked(l1_[l1_index]));
    const uint64_t entry = (*table)[ci & (h_.l2_entries() - 1)];
    auto decoded = DecodeQcowL2Entry(h_, entry, ci, file_end_, info_.path);
    if (!decoded.ok()) return MarkCorrupt(decoded.status());
    c = *decoded;
  }
  if (remap_) {
    const uint64_t backing_size = backing_ ? backing_->size_bytes() : 0;
    if (c.kind == QcowCluster::kNormal) {
      remap_->Insert(ci, Remap{c.host_offset, 0, Remap::kWritable});
    } else if (c.kind == QcowCluster::kUnallocated && ci * cluster_size_ >= backing_size) {
      remap_->Insert(ci, Remap{0, 0, Remap::kZero});
    }
  }
  return c;
}

Status QcowImage::ReadBacking(uint64_t guest, std::span<uint8_t> buf) {
  iovec v = MakeIoVec(buf.data(), buf.size());
  return ReadBackingIov(guest, IoVecs(&v, 1));
}

Status QcowImage::ReadBackingIov(uint64_t guest, IoVecs iov) {
  const uint64_t len = TotalLength(iov);
  const uint64_t backing_size = backing_ ? backing_->size_bytes() : 0;
  const uint64_t have = guest < backing_size ? std::min(len, backing_size - guest) : 0;
  if (have > 0) {
    std::vector<iovec> part;
    SliceIoVecs(iov, 0, have, &part);
    COWTAP_RETURN_IF_ERROR(backing_->Read(guest, part));
  }
  if (have < len) ZeroIoVecs(iov, have, len - have);
  return Status::Ok();
}

Status QcowImage::ReadClusterForCopy(uint64_t ci, const QcowCluster& c, std::span<uint8_t> buf) {
  if (c.kind == QcowCluster::kCompressed) {
    std::vector<uint8_t> packed(c.compressed_bytes);
    COWTAP_RETURN_IF_ERROR(file_->ReadAt(c.host_offset, packed));
    Status s = QcowInflateCluster(packed, buf);
    if (!s.ok()) return MarkCorrupt(s.Annotate(info_.path + ": guest cluster " + std::to_string(ci)));
    return Status::Ok();
  }
  if (c.kind == QcowCluster::kNormal) return file_->ReadAt(c.host_offset, buf);
  return ReadBacking(ci * cluster_size_, buf);
}

Status QcowImage::Read(uint64_t offset, IoVecs iov) {
  const uint64_t total = TotalLength(iov);
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, total, false));
  uint64_t pos = 0;
  std::vector<iovec> part;
  while (pos < total) {
    const uint64_t guest = offset + pos;
    const uint64_t ci = guest / cluster_size_;
    const uint64_t in = guest % cluster_size_;
    QcowCluster c;
    uint64_t n = std::min(cluster_size_ - in, total - pos);
    {
      std::lock_guard lock(mu_);
      COWTAP_ASSIGN_OR_RETURN(c, LookupLocked(ci));
      // Extend the run over following clusters mapped the same way, so that
      // contiguous data and backing ranges become one I/O each.
      while (c.kind != QcowCluster::kCompressed && pos + n < total) {
        const uint64_t next_ci = ci + (in + n) / cluster_size_;
        COWTAP_ASSIGN_OR_RETURN(QcowCluster next, LookupLocked(next_ci));
        if (next.kind != c.kind) break;
        if (c.kind == QcowCluster::kNormal && next.host_offset != c.host_offset + (next_ci - ci) * cluster_size_)
          break;
        n += std::min(cluster_size_, total - pos - n);
      }
    }
    part.clear();
    SliceIoVecs(iov, pos, n, &part);
    switch (c.kind) {
      case QcowCluster::kNormal: COWTAP_RETURN_IF_ERROR(file_->ReadvAt(c.host_offset + in, part)); break;
      case QcowCluster::kUnallocated: COWTAP_RETURN_IF_ERROR(ReadBackingIov(guest, part)); break;
      case QcowCluster::kCompressed: {
        std::vector<uint8_t> buf(cluster_size_);
        COWTAP_RETURN_IF_ERROR(ReadClusterForCopy(ci, c, buf));
        CopyToIoVecs(part, 0, buf.data() + in, n);
        break;
      }
    }
    pos += n;
  }
  return Status::Ok();
}


namespace {

// Appends e to out, merging it into the last extent when they continue each
// other with the same attributes (qemu-img map merges the same way).
void AppendExtent(std::vector<Extent>* out, Extent e) {
  if (!out->empty()) {
    Extent& last = out->back();
    const bool host_continues =
        last.host_offset.has_value() == e.host_offset.has_value() &&
        (!e.host_offset || *last.host_offset + last.length == *e.host_offset);
    if (last.offset + last.length == e.offset && last.data == e.data && last.zero == e.zero &&
        last.compressed == e.compressed && last.depth == e.depth && last.file == e.file && host_continues) {
      last.length += e.length;
      return;
    }
  }
  out->push_back(std::move(e));
}

}  // namespace

Result<std::vector<Extent>> QcowImage::Map(uint64_t offset, uint64_t length) {
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, length, false));
  std::vector<Extent> out;
  const uint64_t backing_size = backing_ ? backing_->size_bytes() : 0;
  uint64_t pos = 0;
  while (pos < length) {
    const uint64_t guest = offset + pos;
    const uint64_t ci = guest / cluster_size_;
    const uint64_t in = guest % cluster_size_;
    uint64_t n = std::min(cluster_size_ - in, length - pos);
    QcowCluster c;
    {
      std::lock_guard lock(mu_);
      COWTAP_ASSIGN_OR_RETURN(c, LookupLocked(ci));
      // Gather a run of unallocated clusters to ask the backing file once.
      while (c.kind == QcowCluster::kUnallocated && pos + n < length) {
        COWTAP_ASSIGN_OR_RETURN(QcowCluster next, LookupLocked((guest + n) / cluster_size_));
        if (next.kind != QcowCluster::kUnallocated) break;
        n += std::min(cluster_size_, length - pos - n);
      }
    }
    Extent e;
    e.offset = guest;
    e.length = n;
    e.file = info_.path;
    if (c.kind == QcowCluster::kNormal) {
      e.data = true;
      e.host_offset = c.host_offset + in;
      AppendExtent(&out, std::move(e));
    } else if (c.kind == QcowCluster::kCompressed) {
      e.data = true;
      e.compressed = true;
      AppendExtent(&out, std::move(e));
    } else {
      uint64_t from_backing = guest < backing_size ? std::min(n, backing_size - guest) : 0;
      if (from_backing > 0) {
        COWTAP_ASSIGN_OR_RETURN(std::vector<Extent> below, backing_->Map(guest, from_backing));
        for (Extent& b : below) {
          b.depth += 1;
          AppendExtent(&out, std::move(b));
        }
      }
      if (from_backing < n) {
        // Past the end of the backing file (or with none): a hole of this
        // layer that reads as zeros; qemu-img map reports it at depth 0.
        e.offset = guest + from_backing;
        e.length = n - from_backing;
        e.zero = true;
        AppendExtent(&out, std::move(e));
      }
    }
    pos += n;
  }
  return out;
}

Result<std::unique_ptr<Image>> OpenQcowImage(std::unique_ptr<File> file, const std::string& path,
                                             const OpenOptions& options, const BackingOpener& open_backing) {
  if (!options.snapshot.empty())
    return Status::NotSupported(path + ": qcow v1 has no internal snapshots (asked for \"" + options.snapshot + "\")");
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  std::array<uint8_t, kQcowHeaderBytes> raw_header{};
  if (file_size >= kQcowHeaderBytes) COWTAP_RETURN_IF_ERROR(file->ReadAt(0, raw_header));
  COWTAP_ASSIGN_OR_RETURN(QcowHeader h, ParseQcowHeader(raw_header, file_size, path));

  std::string backing_name;
  if (h.backing_file_offset != 0) {
    backing_name.resize(h.backing_file_size);
    COWTAP_RETURN_IF_ERROR(file->ReadAt(
        h.backing_file_offset, {reinterpret_cast<uint8_t*>(backing_name.data()), backing_name.size()}));
    if (backing_name.find('\0') != std::string::npos)
      return Status::Corrupt(path + ": backing file name at offset " + std::to_string(h.backing_file_offset) +
                             " contains a NUL byte");
  }

  // The L1 table lies inside the file (checked), so its size is bounded by
  // what the file holds as well as by kQcowMaxL1Bytes.
  const uint64_t l1_size = h.l1_size();
  std::vector<uint8_t> raw_l1(l1_size * 8);
  COWTAP_RETURN_IF_ERROR(file->ReadAt(h.l1_table_offset, raw_l1));
  std::vector<uint64_t> l1(l1_size);
  for (uint64_t i = 0; i < l1_size; ++i) {
    l1[i] = LoadBe64(raw_l1.data() + i * 8);
    if (l1[i] != 0) COWTAP_RETURN_IF_ERROR(ValidateQcowL1Entry(h, l1[i], i, file_size, path));
  }

  std::shared_ptr<Image> backing;
  if (!backing_name.empty()) {
    COWTAP_ASSIGN_OR_RETURN(backing, open_backing(BackingRef{backing_name, std::nullopt}));
  }

  ImageInfo info;
  info.format = ImageFormat::kQcow;
  info.path = path;
  // QEMU sees qcow v1 in whole sectors; so do we.
  info.size_bytes = h.size / 512 * 512;
  info.file_size_bytes = file_size;
  info.cluster_size = static_cast<uint32_t>(h.cluster_size());
  info.version = 1;
  info.read_only = options.read_only;
  info.backing_file = backing_name;
  if (backing) info.backing_path = backing->info().path;

  const uint64_t l2_bytes = h.l2_table_bytes();
  uint64_t cache_bytes = options.l2_cache_bytes;
  if (cache_bytes == 0) cache_bytes = std::min(kQcowDefaultL2CacheBytes, l1_size * l2_bytes);
  const uint64_t cache_tables = std::max<uint64_t>(2, cache_bytes / l2_bytes);
  return std::unique_ptr<Image>(
      new QcowImage(std::move(file), std::move(info), h, std::move(l1), std::move(backing), file_size, cache_tables,
                    options.remap_cache_entries));
}

}  // namespace cowtap::cow
