// cowtap_xen_workload: the disk workload the real-Xen end-to-end harness
// (tests/xen/run.sh) runs inside a PV guest on /dev/xvda, and the host-side
// tools that make and check the images around it. Built static so it runs
// from a busybox initramfs.
//
//   cowtap_xen_workload fill-base FILE BYTES    host: write the base pattern
//   cowtap_xen_workload guest DEVICE            guest: the verifying workload
//                                               (a regular file works too:
//                                               the host self-test)
//   cowtap_xen_workload verify-image FILE       host: a raw export of the disk
//                                               after the run holds what the
//                                               guest wrote (and the base
//                                               where it did not write)
//
// Layout of the disk (at least 64 MiB):
//   [0, 8M)     scattered pattern writes of awkward sizes over the base
//   [8M, 9M)    written, then [8M+256K, 8M+768K) discarded
//   [16M, 24M)  sequential run (1 MiB O_DIRECT writes, fsync, read back)
//   [24M, 64M)  never written: must read as the base
// The guest reads back what it wrote plus 4 MiB of the untouched base (under
// TCG every MiB costs seconds); the host's verify-image checks all 64 MiB.
// Every sector's content is a function of (sector, generation), so the guest
// and the host agree on what each byte must be without passing data around.
// The guest prints "CHECK <name> PASS|FAIL <detail>", "FIGURE <key> <value>"
// and "WORKLOAD: N passed, M failed". Single-threaded.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace cowtap::xen_e2e {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kMinDiskBytes = 64 * kMiB;
constexpr uint32_t kGenBase = 0;     // what fill-base writes
constexpr uint32_t kGenPattern = 1;  // scattered writes
constexpr uint32_t kGenDiscard = 2;  // the discard region
constexpr uint32_t kGenSeq = 3;      // sequential run

// A scattered write: offset and length in sectors, chosen to straddle qcow2
// cluster (64 KiB = 128 sectors) boundaries and leave base sectors between.
struct Extent {
  uint64_t sector;
  uint64_t sectors;
};
const Extent kPatternExtents[] = {
    {0, 8}, {100, 8}, {127, 2}, {256, 24}, {1000, 136}, {2047, 1}, {4096, 2056}, {9000, 7}, {12345, 77}, {14000, 128},
};
constexpr uint64_t kDiscardSector = 8 * kMiB / kSector;
constexpr uint64_t kDiscardSectors = 1 * kMiB / kSector;
constexpr uint64_t kDiscardHoleSector = kDiscardSector + 256 * 1024 / kSector;
constexpr uint64_t kDiscardHoleSectors = 512 * 1024 / kSector;
constexpr uint64_t kSeqSector = 16 * kMiB / kSector;
constexpr uint64_t kSeqBytes = 8 * kMiB;
constexpr uint64_t kUntouchedSector = 48 * kMiB / kSector;
constexpr uint64_t kUntouchedSectors = 4 * kMiB / kSector;  // what the guest reads of it
constexpr uint64_t kWrittenEndSector = 24 * kMiB / kSector;
constexpr int kRandomReads = 100;

// Fills one sector: a readable tag, then a xorshift stream seeded by
// (sector, generation). Different generations never produce equal sectors.
void FillSector(uint64_t sector, uint32_t gen, uint8_t* out) {
  char tag[64];
  std::snprintf(tag, sizeof(tag), "COWTAP g%u s%012" PRIu64, gen, sector);
  std::memset(out, 0, 32);
  std::memcpy(out, tag, std::min<size_t>(std::strlen(tag), 31));
  uint64_t x = (sector + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t{gen} + 1) * 0xC2B2AE3D27D4EB4Full;
  for (size_t i = 32; i < kSector; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(out + i, &x, 8);
  }
}

// Which generation the final disk holds at `sector`, or -1 where the content
// is unspecified (the discarded hole: zeros or old data are both allowed).
int ExpectedGen(uint64_t sector) {
  if (sector >= kDiscardHoleSector && sector < kDiscardHoleSector + kDiscardHoleSectors) return -1;
  if (sector >= kDiscardSector && sector < kDiscardSector + kDiscardSectors) return kGenDiscard;
  if (sector >= kSeqSector && sector < kSeqSector + kSeqBytes / kSector) return kGenSeq;
  for (const Extent& e : kPatternExtents) {
    if (sector >= e.sector && sector < e.sector + e.sectors) return kGenPattern;
  }
  return kGenBase;
}

struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes) : size(bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytes) != 0) std::abort();
    data.reset(static_cast<uint8_t*>(p));
  }
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data;
  size_t size;
};

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool PwriteAll(int fd, const uint8_t* buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, static_cast<off_t>(off));
    if (n <= 0) return false;
    buf += n, len -= static_cast<size_t>(n), off += static_cast<uint64_t>(n);
  }
  return true;
}

bool PreadAll(int fd, uint8_t* buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pread(fd, buf, len, static_cast<off_t>(off));
    if (n <= 0) return false;
    buf += n, len -= static_cast<size_t>(n), off += static_cast<uint64_t>(n);
  }
  return true;
}

class Checker {
 public:
  void Check(const std::string& name, bool ok, const std::string& detail) {
    std::printf("CHECK %s %s %s\n", name.c_str(), ok ? "PASS" : "FAIL", detail.c_str());
    std::fflush(stdout);
    (ok ? passed_ : failed_)++;
  }
  int passed() const { return passed_; }
  int failed() const { return failed_; }

 private:
  int passed_ = 0;
  int failed_ = 0;
};

void Figure(const char* key, double value) {
  std::printf("FIGURE %s %.3f\n", key, value);
  std::fflush(stdout);
}

// Writes generation `gen` over [sector, sector + sectors) in chunks of at most
// `chunk_bytes`.
bool WriteGen(int fd, uint64_t sector, uint64_t sectors, uint32_t gen, AlignedBuffer& buf) {
  const uint64_t chunk = buf.size / kSector;
  for (uint64_t done = 0; done < sectors;) {
    uint64_t n = std::min(chunk, sectors - done);
    for (uint64_t i = 0; i < n; ++i) FillSector(sector + done + i, gen, buf.data.get() + i * kSector);
    if (!PwriteAll(fd, buf.data.get(), n * kSector, (sector + done) * kSector)) return false;
    done += n;
  }
  return true;
}

// Reads [sector, sector + sectors) and compares each sector with what
// ExpectedGen says; returns the number of wrong sectors (first one in *first).
uint64_t VerifyRange(int fd, uint64_t sector, uint64_t sectors, AlignedBuffer& buf, std::string* first) {
  const uint64_t chunk = buf.size / kSector;
  uint8_t want[kSector];
  uint64_t bad = 0;
  for (uint64_t done = 0; done < sectors;) {
    uint64_t n = std::min(chunk, sectors - done);
    if (!PreadAll(fd, buf.data.get(), n * kSector, (sector + done) * kSector)) {
      if (first->empty()) *first = "read error at sector " + std::to_string(sector + done) + ": " + strerror(errno);
      return bad + (sectors - done);
    }
    for (uint64_t i = 0; i < n; ++i) {
      uint64_t s = sector + done + i;
      int gen = ExpectedGen(s);
      if (gen < 0) continue;
      FillSector(s, static_cast<uint32_t>(gen), want);
      if (std::memcmp(want, buf.data.get() + i * kSector, kSector) != 0) {
        if (bad == 0 && first->empty()) {
          char got[33] = {};
          std::memcpy(got, buf.data.get() + i * kSector, 32);
          for (char& c : got) c = (c >= 32 && c < 127) ? c : '.';
          *first = "sector " + std::to_string(s) + " want g" + std::to_string(gen) + " got '" + got + "'";
        }
        ++bad;
      }
    }
    done += n;
  }
  return bad;
}

// "ok" for a call that returned 0, else what errno says.
std::string RcDetail(int rc) { return rc == 0 ? "ok" : strerror(errno); }

std::string Detail(uint64_t bad, const std::string& first) {
  return bad == 0 ? "ok" : std::to_string(bad) + " bad sectors, first: " + first;
}

int FillBase(const char* path, uint64_t bytes) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return std::perror(path), 1;
  AlignedBuffer buf(kMiB);
  bool ok = WriteGen(fd, 0, bytes / kSector, kGenBase, buf) && fsync(fd) == 0;
  close(fd);
  if (!ok) return std::perror(path), 1;
  return 0;
}

int VerifyImage(const char* path) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return std::perror(path), 1;
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < kMinDiskBytes) {
    std::fprintf(stderr, "%s: smaller than %" PRIu64 " bytes\n", path, kMinDiskBytes);
    return 1;
  }
  AlignedBuffer buf(kMiB);
  std::string first;
  uint64_t bad = VerifyRange(fd, 0, kMinDiskBytes / kSector, buf, &first);
  close(fd);
  std::printf("verify-image %s: %s\n", path, Detail(bad, first).c_str());
  return bad == 0 ? 0 : 1;
}

int Guest(const char* dev) {
  Checker c;
  int fd = open(dev, O_RDWR | O_DIRECT);
  if (fd < 0) {
    c.Check("open", false, std::string(dev) + ": " + strerror(errno));
    std::printf("WORKLOAD: %d passed, %d failed\n", c.passed(), c.failed());
    return 1;
  }
  // A regular file stands in for the disk in the host-side self-test.
  struct stat st;
  const bool is_file = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  uint64_t size = is_file ? static_cast<uint64_t>(st.st_size) : 0;
  bool size_ok = (is_file || ioctl(fd, BLKGETSIZE64, &size) == 0) && size >= kMinDiskBytes;
  c.Check("size", size_ok, std::to_string(size) + " bytes");
  if (!size_ok) {
    std::printf("WORKLOAD: %d passed, %d failed\n", c.passed(), c.failed());
    return 1;
  }
  AlignedBuffer big(kMiB);
  std::string first;
  uint64_t bad;

  // 1. The base shows through where nothing was written.
  bad = VerifyRange(fd, kUntouchedSector, kUntouchedSectors, big, &first);
  c.Check("base_read", bad == 0, Detail(bad, first));

  // 2. Scattered writes of awkward sizes over the base, read back with the
  // base sectors between them (partial-cluster copy-on-write).
  bool wrote = true;
  for (const Extent& e : kPatternExtents) wrote &= WriteGen(fd, e.sector, e.sectors, kGenPattern, big);
  c.Check("pattern_write", wrote, wrote ? "ok" : strerror(errno));
  first.clear();
  bad = VerifyRange(fd, 0, 8 * kMiB / kSector, big, &first);
  c.Check("pattern_readback", bad == 0, Detail(bad, first));

  // 3. Flush: fsync on the O_DIRECT descriptor (FLUSH_DISKCACHE or a
  // barrier on the ring), and a buffered write made durable by fdatasync.
  double t0 = NowSeconds();
  int frc = fsync(fd);
  c.Check("fsync_direct", frc == 0, RcDetail(frc));
  Figure("fsync_ms", (NowSeconds() - t0) * 1e3);
  {
    int bfd = open(dev, O_RDWR);
    uint8_t sector_buf[kSector];
    FillSector(kPatternExtents[0].sector, kGenPattern, sector_buf);
    bool ok =
        bfd >= 0 && PwriteAll(bfd, sector_buf, kSector, kPatternExtents[0].sector * kSector) && fdatasync(bfd) == 0;
    c.Check("fdatasync_buffered", ok, ok ? "ok" : strerror(errno));
    if (bfd >= 0) close(bfd);
  }

  // 4. Discard the middle of a written MiB; the rest must survive.
  bool dw = WriteGen(fd, kDiscardSector, kDiscardSectors, kGenDiscard, big) && fsync(fd) == 0;
  c.Check("discard_prepare", dw, dw ? "ok" : strerror(errno));
  uint64_t range[2] = {kDiscardHoleSector * kSector, kDiscardHoleSectors * kSector};
  t0 = NowSeconds();
  int rc = is_file ? fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(range[0]),
                               static_cast<off_t>(range[1]))
                   : ioctl(fd, BLKDISCARD, range);
  if (rc != 0 && errno == EOPNOTSUPP) {
    c.Check("discard", true, "not advertised by the backend (EOPNOTSUPP), skipped");
  } else {
    c.Check("discard", rc == 0, rc == 0 ? "ok" : strerror(errno));
    Figure("discard_ms", (NowSeconds() - t0) * 1e3);
  }
  first.clear();
  bad = VerifyRange(fd, kDiscardSector, kDiscardSectors, big, &first);
  c.Check("discard_neighbours", bad == 0, Detail(bad, first));

  // 5. Sequential run with timings.
  t0 = NowSeconds();
  bool sw = WriteGen(fd, kSeqSector, kSeqBytes / kSector, kGenSeq, big);
  double t1 = NowSeconds();
  bool sf = fsync(fd) == 0;
  double t2 = NowSeconds();
  c.Check("seq_write", sw && sf, sw && sf ? "ok" : strerror(errno));
  Figure("seq_write_MBps", kSeqBytes / kMiB / (t1 - t0));
  Figure("seq_write_fsync_ms", (t2 - t1) * 1e3);
  first.clear();
  t0 = NowSeconds();
  bad = VerifyRange(fd, kSeqSector, kSeqBytes / kSector, big, &first);
  t1 = NowSeconds();
  c.Check("seq_readback", bad == 0, Detail(bad, first));
  Figure("seq_read_MBps", kSeqBytes / kMiB / (t1 - t0));

  // 6. 4 KiB random-read latency over the written and base areas.
  {
    AlignedBuffer small(4096);
    std::vector<double> lat;
    uint64_t x = 88172645463325252ull;
    bool ok = true;
    for (int i = 0; i < kRandomReads && ok; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      uint64_t off = (x % (kMinDiskBytes / 4096)) * 4096;
      double s = NowSeconds();
      ok = PreadAll(fd, small.data.get(), 4096, off);
      lat.push_back((NowSeconds() - s) * 1e6);
    }
    std::sort(lat.begin(), lat.end());
    c.Check("rand_read_4k", ok, ok ? std::to_string(kRandomReads) + " reads" : std::string(strerror(errno)));
    Figure("rand_read_4k_avg_us", [&] {
      double sum = 0;
      for (double v : lat) sum += v;
      return sum / static_cast<double>(lat.size());
    }());
    Figure("rand_read_4k_p99_us", lat[lat.size() * 99 / 100]);
  }

  // 7. Everything again, end to end, as the host will check it.
  first.clear();
  bad = VerifyRange(fd, 0, kWrittenEndSector, big, &first);
  bad += VerifyRange(fd, kUntouchedSector, kUntouchedSectors, big, &first);
  c.Check("final_verify", bad == 0, Detail(bad, first));
  frc = fsync(fd);
  c.Check("final_fsync", frc == 0, RcDetail(frc));
  close(fd);
  std::printf("WORKLOAD: %d passed, %d failed\n", c.passed(), c.failed());
  std::fflush(stdout);
  return c.failed() == 0 ? 0 : 1;
}

int Usage() {
  std::fprintf(stderr, "usage: cowtap_xen_workload fill-base FILE BYTES | guest DEVICE | verify-image FILE\n");
  return 2;
}

}  // namespace
}  // namespace cowtap::xen_e2e

int main(int argc, char** argv) {
  using namespace cowtap::xen_e2e;
  if (argc == 4 && std::strcmp(argv[1], "fill-base") == 0) {
    char* end = nullptr;
    unsigned long long bytes = std::strtoull(argv[3], &end, 0);
    if (*end != '\0' || bytes < kMinDiskBytes || bytes % kMiB != 0) return Usage();
    return FillBase(argv[2], bytes);
  }
  if (argc == 3 && std::strcmp(argv[1], "guest") == 0) return Guest(argv[2]);
  if (argc == 3 && std::strcmp(argv[1], "verify-image") == 0) return VerifyImage(argv[2]);
  return Usage();
}
