#include "xen-glue/blkfront_guest.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "base/endian.h"

namespace cowtap::xen {
namespace {

class Checks {
 public:
  explicit Checks(std::ostream& out) : out_(out) {}
  void Expect(bool ok, const std::string& name, const std::string& why = "") {
    if (ok) {
      ++passed_;
      out_ << "PASS " << name << "\n";
    } else {
      ++failed_;
      out_ << "FAIL " << name << ": " << why << "\n";
    }
    out_.flush();
  }
  void ExpectOk(const Status& s, const std::string& name) { Expect(s.ok(), name, s.ToString()); }
  int Finish() {
    out_ << "result: " << passed_ << " passed, " << failed_ << " failed" << std::endl;
    return failed_ == 0 ? 0 : 1;
  }

 private:
  std::ostream& out_;
  int passed_ = 0;
  int failed_ = 0;
};

std::vector<uint8_t> Pattern(uint64_t sector, uint32_t nr, uint32_t generation, uint64_t seed) {
  std::vector<uint8_t> buf(size_t{nr} * kGuestSectorBytes);
  for (uint32_t i = 0; i < nr; ++i) FillWorkloadPattern(sector + i, generation, seed, buf.data() + i * kGuestSectorBytes);
  return buf;
}

uint64_t g_cookie = 1u << 20;

Result<int16_t> Sync(BlkFront& front, BlkOp op, uint64_t sector, uint32_t nr, uint8_t* buf) {
  return ExecuteSync(front, BlkIo{op, sector, nr, buf, g_cookie++});
}

// Writes a pattern and reads it back; empty string on success, else why not.
std::string WriteReadBack(BlkFront& front, BlkOp write_op, uint64_t sector, uint32_t nr, uint32_t generation) {
  std::vector<uint8_t> data = Pattern(sector, nr, generation, 4242);
  auto w = Sync(front, write_op, sector, nr, data.data());
  if (!w.ok()) return w.status().ToString();
  if (*w != kBlkifRspOkay) return fmt::format("{} answered status {}", BlkOpName(write_op), *w);
  std::vector<uint8_t> back(data.size(), 0xEE);
  auto r = Sync(front, BlkOp::kRead, sector, nr, back.data());
  if (!r.ok()) return r.status().ToString();
  if (*r != kBlkifRspOkay) return fmt::format("read answered status {}", *r);
  if (back != data) return fmt::format("read back of {} sectors at {} differs from what was written", nr, sector);
  return "";
}

// Waits for the completion of `cookie`; nullopt if none came in wait_ms.
std::optional<int16_t> WaitFor(BlkFront& front, uint64_t cookie, int wait_ms, std::ostream& out) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  std::vector<BlkCompletion> done;
  while (std::chrono::steady_clock::now() < deadline) {
    auto n = front.Poll(&done, 50);
    if (!n.ok()) {
      out << "info poll_error=\"" << n.status().ToString() << "\"\n";
      return std::nullopt;
    }
    for (const BlkCompletion& c : done) {
      if (c.cookie == cookie) return c.status;
    }
    done.clear();
  }
  return std::nullopt;
}

void PrintDevice(const BlkFront& front, std::ostream& out) {
  const BlkfrontDevice& d = front.device();
  out << fmt::format(
             "info sectors={} sector_size={} physical_sector_size={} info={} read_only={} ring_page_order={} "
             "ring_entries={} queues={} persistent={} indirect_segments={} flush={} barrier={} discard={} "
             "discard_secure={} discard_granularity={}",
             d.sectors, d.sector_size, d.physical_sector_size, d.info, d.read_only, d.ring_page_order,
             d.ring_entries, d.num_queues, d.persistent, d.indirect_segments, d.flush, d.barrier, d.discard,
             d.discard_secure, d.discard_granularity)
      << std::endl;
}

Status Fill(BlkFront& front, const WorkloadOptions& w) {
  const uint64_t start = w.region_start;
  const uint64_t count = w.region_sectors ? w.region_sectors : front.sectors() - start;
  const uint32_t chunk = std::min<uint32_t>(front.max_sectors_per_io(), 256);
  for (uint64_t off = 0; off < count; off += chunk) {
    const uint32_t nr = static_cast<uint32_t>(std::min<uint64_t>(chunk, count - off));
    std::vector<uint8_t> data = Pattern(start + off, nr, 0, w.initial_seed);
    COWTAP_ASSIGN_OR_RETURN(int16_t st, Sync(front, BlkOp::kWrite, start + off, nr, data.data()));
    if (st != kBlkifRspOkay) return Status::IoError(fmt::format("fill write at {} answered {}", start + off, st));
  }
  if (front.Supports(BlkOp::kFlush)) {
    COWTAP_ASSIGN_OR_RETURN(int16_t st, Sync(front, BlkOp::kFlush, 0, 0, nullptr));
    if (st != kBlkifRspOkay) return Status::IoError(fmt::format("flush answered {}", st));
  }
  return Status::Ok();
}

void RunWorkload(BlkFront& front, const GuestRunOptions& o, Checks& checks, std::ostream& out,
                 const std::string& name) {
  auto w = Workload::Create(front, o.workload);
  if (!w.ok()) return checks.ExpectOk(w.status(), name);
  auto report = w->Run();
  if (!report.ok()) return checks.ExpectOk(report.status(), name);
  out << "workload: " << report->Summary() << "\n";
  for (const std::string& m : report->mismatch_details) out << "mismatch: " << m << "\n";
  checks.Expect(report->passed(), name, fmt::format("{} errors, {} mismatches", report->errors, report->mismatches));
  if (!o.model_out.empty()) {
    const uint64_t start = o.workload.region_start;
    const uint64_t count = o.workload.region_sectors ? o.workload.region_sectors : front.sectors() - start;
    std::vector<uint32_t> tags;
    tags.reserve(count);
    for (uint64_t s = start; s < start + count; ++s) tags.push_back(w->ModelGeneration(s));
    checks.ExpectOk(WriteModelFile(o.model_out, tags), "model-written");
  }
}

// A raw request answered with `want` (any status when want is nullopt).
void ExpectRaw(BlkFront& front, const GuestRunOptions& o, Checks& checks, std::ostream& out, const std::string& name,
               BlkifRequest req, std::initializer_list<int16_t> want) {
  const uint64_t cookie = g_cookie++;
  Status s = front.SubmitRaw(0, req, cookie);
  if (!s.ok()) return checks.ExpectOk(s, name);
  std::optional<int16_t> st = WaitFor(front, cookie, o.misbehave_wait_ms, out);
  out << "info " << name << "_status=" << (st ? std::to_string(*st) : "none") << "\n";
  const bool ok = st && std::find(want.begin(), want.end(), *st) != want.end();
  checks.Expect(ok, name, st ? fmt::format("answered {}", *st) : "no answer");
}

BlkifRequest RawRw(uint8_t op, uint64_t sector, GrantRef gref, uint8_t first, uint8_t last, uint16_t nsegs = 1) {
  BlkifRequest r;
  r.operation = op;
  r.sector_number = sector;
  r.nr_segments = nsegs;
  for (uint32_t i = 0; i < kBlkifMaxDirectSegments; ++i) r.seg[i] = {gref, first, last};
  return r;
}

// A misbehaviour scenario could not even prepare its bad request.
int SetupFailed(Checks& checks, const Status& why) {
  checks.ExpectOk(why, "scratch-page");
  return checks.Finish();
}

void ProbeAlive(BlkFront& front, Checks& checks, const std::string& name) {
  std::string why = WriteReadBack(front, BlkOp::kWrite, 16, 8, 77);
  checks.Expect(why.empty(), name, why);
}

void RunOps(BlkFront& front, Checks& checks) {
  const BlkfrontDevice& d = front.device();
  const uint64_t n = d.sectors;
  if (d.read_only) {
    std::vector<uint8_t> buf(4096);
    auto r = Sync(front, BlkOp::kRead, 0, 8, buf.data());
    checks.Expect(r.ok() && *r == kBlkifRspOkay, "read-on-readonly", r.ok() ? std::to_string(*r) : r.status().ToString());
    checks.Expect(front.Submit(BlkIo{BlkOp::kWrite, 0, 8, buf.data(), 1}).code() == ErrorCode::kNotSupported,
                  "write-not-offered-on-readonly");
    return;
  }
  auto check = [&](const std::string& name, const std::string& why) { checks.Expect(why.empty(), name, why); };
  check("rw-direct-1-segment", WriteReadBack(front, BlkOp::kWrite, 0, 8, 1));
  check("rw-partial-segment", WriteReadBack(front, BlkOp::kWrite, 5 % n, 3, 2));
  check("rw-11-segments", WriteReadBack(front, BlkOp::kWrite, 64, 88, 3));
  if (d.indirect_segments > 0) {
    const uint32_t nr = std::min<uint32_t>(front.max_sectors_per_io(), 1024);
    check("rw-indirect", WriteReadBack(front, BlkOp::kWrite, 1024, nr, 4));
    check("rw-indirect-odd-size", WriteReadBack(front, BlkOp::kWrite, 3000, 97, 5));
  }
  check("rw-last-sector", WriteReadBack(front, BlkOp::kWrite, n - 1, 1, 6));
  std::vector<uint8_t> buf(4096);
  checks.Expect(front.Submit(BlkIo{BlkOp::kRead, n, 1, buf.data(), 1}).code() == ErrorCode::kOutOfRange,
                "read-beyond-end-refused-locally");
  if (d.barrier) {
    check("write-barrier", WriteReadBack(front, BlkOp::kWriteBarrier, 2048, 16, 7));
  }
  if (d.flush) {
    auto f = Sync(front, BlkOp::kFlush, 0, 0, nullptr);
    checks.Expect(f.ok() && *f == kBlkifRspOkay, "flush", f.ok() ? std::to_string(*f) : f.status().ToString());
  }
  for (BlkOp op : {BlkOp::kDiscard, BlkOp::kSecureDiscard}) {
    if (!front.Supports(op)) continue;
    const uint64_t unit = std::max<uint64_t>(d.discard_granularity / kGuestSectorBytes, 8);
    const uint64_t start = (op == BlkOp::kDiscard ? 8 : 12) * unit;
    const uint32_t nr = static_cast<uint32_t>(2 * unit);
    if (start + nr > n) continue;
    std::string why = WriteReadBack(front, BlkOp::kWrite, start, nr, 8);
    if (why.empty()) {
      auto r = Sync(front, op, start, nr, nullptr);
      if (!r.ok() || *r != kBlkifRspOkay) {
        why = fmt::format("{} answered {}", BlkOpName(op), r.ok() ? std::to_string(*r) : r.status().ToString());
      } else {
        std::vector<uint8_t> back(size_t{nr} * kGuestSectorBytes, 0xEE);
        auto rd = Sync(front, BlkOp::kRead, start, nr, back.data());
        if (!rd.ok() || *rd != kBlkifRspOkay) {
          why = "read after discard failed";
        } else if (std::any_of(back.begin(), back.end(), [](uint8_t b) { return b != 0; })) {
          why = fmt::format("granularity-aligned discarded range [{}, +{}) does not read as zeros", start, nr);
        }
      }
    }
    checks.Expect(why.empty(), std::string(BlkOpName(op)) + "-reads-zero", why);
  }
}

}  // namespace

const std::vector<std::string>& GuestScenarios() {
  static const std::vector<std::string> kNames = {
      "workload",     "ops",       "fill",        "reconnect",         "resize",
      "flush-then-die", "die-mid-io", "garbage",  "out-of-range",      "bad-gref",
      "bad-segments", "unknown-op", "revoke-before-push", "revoke-after-push", "race-req-prod",
      "notify-flood"};
  return kNames;
}

int RunGuest(const GuestRunOptions& options, std::ostream& out) {
  GuestRunOptions o = options;
  if (!o.initial_model.empty()) {
    auto tags = ReadModelFile(o.initial_model);
    if (!tags.ok()) {
      out << "setup error: " << tags.status().ToString() << std::endl;
      return 2;
    }
    o.workload.initial_tags = std::move(*tags);
  }
  SimGuestOptions go;
  go.domid = o.domid;
  go.ram_pages = o.ram_pages;
  go.grant_entries = o.grant_entries;
  auto guest = SimGuest::Connect(o.socket_path, go);
  if (!guest.ok()) {
    out << "setup error: " << guest.status().ToString() << std::endl;
    return 2;
  }
  auto attached = BlkFront::Attach(**guest, o.devid, o.front);
  if (!attached.ok()) {
    out << "setup error: " << attached.status().ToString() << std::endl;
    return 2;
  }
  BlkFront& front = **attached;
  PrintDevice(front, out);
  Checks checks(out);
  const std::string& sc = o.scenario;
  if (sc == "workload") {
    RunWorkload(front, o, checks, out, "workload");
  } else if (sc == "ops") {
    RunOps(front, checks);
  } else if (sc == "fill") {
    checks.ExpectOk(Fill(front, o.workload), "fill");
  } else if (sc == "reconnect") {
    checks.ExpectOk(Fill(front, o.workload), "fill-before-reconnect");
    for (uint32_t i = 0; i < o.reconnects; ++i) {
      checks.ExpectOk(front.Disconnect(), fmt::format("disconnect-{}", i));
      checks.ExpectOk(front.Reconnect(), fmt::format("reconnect-{}", i));
      PrintDevice(front, out);
    }
    GuestRunOptions verify = o;
    verify.workload.initial = InitialContent::kPattern;
    RunWorkload(front, verify, checks, out, "workload-after-reconnect");
  } else if (sc == "resize") {
    const uint64_t before = front.sectors();
    out << "READY sectors=" << before << std::endl;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(o.front.handshake_timeout_ms);
    std::vector<BlkCompletion> none;
    while (front.sectors() == before && std::chrono::steady_clock::now() < deadline) {
      auto n = front.Poll(&none, 50);
      if (!n.ok()) break;
    }
    const uint64_t after = front.sectors();
    out << "info new_sectors=" << after << " resize_events=" << front.stats().resize_events << "\n";
    checks.Expect(after != before, "resize-seen", "sectors did not change");
    if (after > before) {
      const uint32_t nr = static_cast<uint32_t>(std::min<uint64_t>(after - before, 64));
      std::string why = WriteReadBack(front, BlkOp::kWrite, after - nr, nr, 9);
      checks.Expect(why.empty(), "rw-in-grown-area", why);
    }
  } else if (sc == "flush-then-die") {
    checks.ExpectOk(Fill(front, o.workload), "fill-and-flush");
    checks.Finish();
    out << "FLUSHED" << std::endl;
    (*guest)->DieAbruptly();
  } else if (sc == "die-mid-io") {
    uint32_t submitted = 0;
    std::vector<std::vector<uint8_t>> bufs;
    for (uint32_t i = 0; i < o.workload.queue_depth; ++i) {
      const uint64_t sector = (uint64_t{i} * o.workload.block_sectors) % (front.sectors() - o.workload.block_sectors);
      bufs.push_back(Pattern(sector, o.workload.block_sectors, 1, o.workload.seed));
      if (!front.Submit(BlkIo{BlkOp::kWrite, sector, o.workload.block_sectors, bufs.back().data(), i + 1}).ok()) break;
      ++submitted;
    }
    out << "DYING inflight=" << front.InFlight() << " submitted=" << submitted << std::endl;
    (*guest)->DieAbruptly();
  } else if (sc == "garbage") {
    checks.ExpectOk(front.InjectGarbage(0, 8, o.workload.seed), "garbage-pushed");
    std::vector<BlkCompletion> none;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(o.misbehave_wait_ms);
    while (std::chrono::steady_clock::now() < deadline) {
      if (!front.Poll(&none, 50).ok()) break;
    }
    out << "info garbage_answers=" << front.stats().unexpected_responses << std::endl;
  } else if (sc == "out-of-range") {
    auto page = front.GrantScratchPage(false);
    if (!page.ok()) return SetupFailed(checks, page.status());
    const uint64_t n = front.sectors();
    ExpectRaw(front, o, checks, out, "read-at-end", RawRw(kBlkifOpRead, n, *page, 0, 7), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "read-straddling-end", RawRw(kBlkifOpRead, n - 4, *page, 0, 7), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "read-sector-overflow", RawRw(kBlkifOpRead, UINT64_MAX - 3, *page, 0, 7),
              {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "write-at-end", RawRw(kBlkifOpWrite, n, *page, 0, 0), {kBlkifRspError});
    BlkifRequest discard;
    discard.operation = kBlkifOpDiscard;
    discard.sector_number = n - 8;
    discard.nr_sectors = 16;
    ExpectRaw(front, o, checks, out, "discard-beyond-end", discard, {kBlkifRspError, kBlkifRspEopnotsupp});
    ProbeAlive(front, checks, "ring-still-serves");
  } else if (sc == "bad-gref") {
    auto ro = front.GrantScratchPage(true);
    if (!ro.ok()) return SetupFailed(checks, ro.status());
    ExpectRaw(front, o, checks, out, "gref-beyond-table", RawRw(kBlkifOpRead, 0, 0x00ffffff, 0, 7), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "gref-reserved-0", RawRw(kBlkifOpRead, 0, 0, 0, 7), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "gref-never-granted",
              RawRw(kBlkifOpWrite, 0, o.grant_entries - 1, 0, 7), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "read-into-readonly-grant", RawRw(kBlkifOpRead, 0, *ro, 0, 7), {kBlkifRspError});
    if (front.device().indirect_segments > 0) {
      BlkifRequest ind;
      ind.operation = kBlkifOpIndirect;
      ind.indirect_op = kBlkifOpRead;
      ind.nr_segments = 16;
      ind.nr_indirect_pages = 1;
      ind.indirect_grefs[0] = 0x00fffffe;
      ExpectRaw(front, o, checks, out, "indirect-page-gref-invalid", ind, {kBlkifRspError});
    }
    ProbeAlive(front, checks, "ring-still-serves");
  } else if (sc == "bad-segments") {
    auto page = front.GrantScratchPage(false);
    if (!page.ok()) return SetupFailed(checks, page.status());
    ExpectRaw(front, o, checks, out, "first-after-last", RawRw(kBlkifOpRead, 0, *page, 4, 2), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "last-sect-8", RawRw(kBlkifOpRead, 0, *page, 0, 8), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "zero-segments-read", RawRw(kBlkifOpRead, 0, *page, 0, 7, 0), {kBlkifRspError});
    ExpectRaw(front, o, checks, out, "twelve-segments", RawRw(kBlkifOpRead, 0, *page, 0, 7, 12), {kBlkifRspError});
    BlkifRequest ind;
    ind.operation = kBlkifOpIndirect;
    ind.indirect_op = kBlkifOpRead;
    ind.nr_segments = 4096 + 1;
    ind.nr_indirect_pages = 1;
    ind.indirect_grefs[0] = *page;
    ExpectRaw(front, o, checks, out, "indirect-too-many-segments", ind, {kBlkifRspError, kBlkifRspEopnotsupp});
    ind.nr_segments = 0;
    ExpectRaw(front, o, checks, out, "indirect-zero-segments", ind, {kBlkifRspError, kBlkifRspEopnotsupp});
    ind.nr_segments = 4;
    ind.indirect_op = kBlkifOpDiscard;
    ExpectRaw(front, o, checks, out, "indirect-bad-inner-op", ind, {kBlkifRspError, kBlkifRspEopnotsupp});
    ProbeAlive(front, checks, "ring-still-serves");
  } else if (sc == "unknown-op") {
    auto page = front.GrantScratchPage(false);
    if (!page.ok()) return SetupFailed(checks, page.status());
    ExpectRaw(front, o, checks, out, "op-0x55", RawRw(0x55, 0, *page, 0, 7), {kBlkifRspEopnotsupp});
    ExpectRaw(front, o, checks, out, "op-reserved-4", RawRw(4, 0, *page, 0, 7), {kBlkifRspEopnotsupp});
    ProbeAlive(front, checks, "ring-still-serves");
  } else if (sc == "revoke-before-push" || sc == "revoke-after-push") {
    const bool before = sc == "revoke-before-push";
    std::vector<uint8_t> data = Pattern(256, 8, 3, 1);
    const uint64_t cookie = g_cookie++;
    Status s = front.SubmitThenRevoke(BlkIo{BlkOp::kWrite, 256, 8, data.data(), cookie}, before);
    checks.ExpectOk(s, "revoke-submitted");
    std::optional<int16_t> st = WaitFor(front, cookie, o.misbehave_wait_ms, out);
    out << "info revoked_status=" << (st ? std::to_string(*st) : "none") << std::endl;
    checks.Expect(st.has_value(), "revoked-request-answered", "no answer");
    if (before && !front.device().persistent) {
      checks.Expect(st && *st == kBlkifRspError, "revoked-before-map-fails", st ? std::to_string(*st) : "none");
    }
    ProbeAlive(front, checks, "ring-still-serves");
  } else if (sc == "race-req-prod") {
    checks.ExpectOk(front.RaceReqProd(0, 5), "req-prod-raced");
    std::vector<BlkCompletion> done;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(o.misbehave_wait_ms);
    bool poll_failed = false;
    while (std::chrono::steady_clock::now() < deadline && !poll_failed) {
      poll_failed = !front.Poll(&done, 50).ok();
    }
    out << "info answers_after_race=" << done.size() + front.stats().unexpected_responses
        << " backend_left=" << poll_failed << std::endl;
  } else if (sc == "notify-flood") {
    checks.ExpectOk(front.NotifyFlood(0, 100000), "flood-sent");
    RunWorkload(front, o, checks, out, "workload-after-flood");
  } else {
    out << "setup error: unknown scenario " << sc << std::endl;
    return 2;
  }
  out << fmt::format("info submitted={} completed={} notifications={} indirect_requests={} grants_created={}",
                     front.stats().submitted, front.stats().completed, front.stats().notifications_sent,
                     front.stats().indirect_requests, front.stats().grants_created)
      << std::endl;
  // Even after a halted ring the backend must let go of every grant on Closing.
  checks.ExpectOk(front.Disconnect(), "disconnect");
  checks.Expect(front.leaked_grants() == 0, "no-grants-left-mapped",
                fmt::format("{} grants still mapped by the backend", front.leaked_grants()));
  return checks.Finish();
}

}  // namespace cowtap::xen
