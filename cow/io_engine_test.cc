// Tests of IoEngine in both modes (io_uring and the threads fallback) on real
// files in a temporary directory: data against a model under concurrent
// random I/O, plugged batches, continuation of short transfers, zeros past end
// of file, errors that name the file and offset, bounded queues, completions
// that submit, destruction with ops in flight, the forced fallback, and
// PosixFile's Submit* forms (O_DIRECT included).
#include "cow/io_engine.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cow/file.h"

namespace cowtap::cow {
namespace {

class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/cowtap-io-XXXXXX";
    path_ = ::mkdtemp(tmpl.data()) ? tmpl : "";
  }
  ~TempDir() {
    if (!path_.empty()) std::system(("rm -rf '" + path_ + "'").c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Collects completions; Wait() returns once `n` have run.
class Waiter {
 public:
  FileCompletion Callback() {
    return [this](Status s) {
      std::lock_guard l(mu_);
      statuses_.push_back(std::move(s));
      cv_.notify_all();
    };
  }
  std::vector<Status> Wait(size_t n) {
    std::unique_lock l(mu_);
    cv_.wait(l, [&] { return statuses_.size() >= n; });
    return statuses_;
  }
  size_t count() {
    std::lock_guard l(mu_);
    return statuses_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Status> statuses_;
};

struct OpenedFile {
  int fd = -1;
  std::string path;
  ~OpenedFile() {
    if (fd >= 0) ::close(fd);
  }
};

class IoEngineTest : public ::testing::TestWithParam<IoEngineKind> {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    IoEngineOptions o;
    o.kind = GetParam();
    auto e = IoEngine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    engine_ = std::move(e).value();
  }

  std::unique_ptr<OpenedFile> Open(const std::string& name, int flags = O_RDWR | O_CREAT) {
    auto f = std::make_unique<OpenedFile>();
    f->path = dir_.path() + "/" + name;
    f->fd = ::open(f->path.c_str(), flags | O_CLOEXEC, 0644);
    EXPECT_GE(f->fd, 0) << f->path << ": " << std::strerror(errno);
    return f;
  }

  IoTarget Target(const OpenedFile& f) { return IoTarget{f.fd, -1, false, &f.path, nullptr}; }

  Status Run(IoOp op, const IoTarget& t, uint64_t offset, IoVecs iov) {
    Waiter w;
    engine_->Submit(op, t, offset, iov, w.Callback());
    return w.Wait(1)[0];
  }

  TempDir dir_;
  std::unique_ptr<IoEngine> engine_;
};

TEST_P(IoEngineTest, RunsInTheAskedMode) {
  if (GetParam() == IoEngineKind::kUring && engine_->kind() != IoEngineKind::kUring) {
    GTEST_SKIP() << "io_uring unavailable here: " << engine_->fallback_reason();
  }
  EXPECT_EQ(engine_->kind(), GetParam());
}

TEST_P(IoEngineTest, WritesThenReadsBackScatteredBuffers) {
  auto f = Open("a");
  std::string a(1000, 'a'), b(3000, 'b');
  iovec wv[] = {MakeIoVec(a.data(), a.size()), MakeIoVec(b.data(), b.size())};
  ASSERT_TRUE(Run(IoOp::kWritev, Target(*f), 123, wv).ok());
  ASSERT_TRUE(Run(IoOp::kFdatasync, Target(*f), 0, {}).ok());
  std::string x(2000, '?'), y(2000, '?');
  iovec rv[] = {MakeIoVec(x.data(), x.size()), MakeIoVec(y.data(), y.size())};
  ASSERT_TRUE(Run(IoOp::kReadv, Target(*f), 123, rv).ok());
  EXPECT_EQ(x + y, a + b);
  EXPECT_EQ(::lseek(f->fd, 0, SEEK_END), 123 + 4000);
}

TEST_P(IoEngineTest, ReadPastEndOfFileFillsZeros) {
  auto f = Open("eof");
  std::string data(1000, 'd');
  ASSERT_EQ(::pwrite(f->fd, data.data(), data.size(), 0), 1000);
  std::string buf(4096, '\xAA');
  iovec v = MakeIoVec(buf.data(), buf.size());
  ASSERT_TRUE(Run(IoOp::kReadv, Target(*f), 0, {&v, 1}).ok());
  EXPECT_EQ(buf.substr(0, 1000), data);
  EXPECT_EQ(buf.substr(1000), std::string(3096, '\0'));
  std::string far(512, '\xAA');
  iovec fv = MakeIoVec(far.data(), far.size());
  ASSERT_TRUE(Run(IoOp::kReadv, Target(*f), 1 << 20, {&fv, 1}).ok());
  EXPECT_EQ(far, std::string(512, '\0'));
}

TEST_P(IoEngineTest, ContinuesTransfersLongerThanOneSyscallTakes) {
  // 3000 segments: more than one readv/writev may carry (IOV_MAX 1024), so the
  // engine must continue the op for the remainder.
  auto f = Open("many");
  constexpr size_t kSegs = 3000, kLen = 16;
  std::vector<char> src(kSegs * kLen);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<char>(i * 7 + i / 251);
  std::vector<iovec> wv;
  for (size_t i = 0; i < kSegs; ++i) wv.push_back(MakeIoVec(src.data() + i * kLen, kLen));
  const auto before = engine_->stats().continuations;
  ASSERT_TRUE(Run(IoOp::kWritev, Target(*f), 5, wv).ok());
  std::vector<char> dst(src.size(), 0);
  std::vector<iovec> rv;
  for (size_t i = 0; i < kSegs; ++i) rv.push_back(MakeIoVec(dst.data() + i * kLen, kLen));
  ASSERT_TRUE(Run(IoOp::kReadv, Target(*f), 5, rv).ok());
  EXPECT_EQ(dst, src);
  EXPECT_GE(engine_->stats().continuations - before, 4u);
}

TEST_P(IoEngineTest, ErrorNamesTheFileTheOffsetAndTheErrno) {
  auto f = Open("ro", O_RDONLY | O_CREAT);
  std::string data(512, 'x');
  iovec v = MakeIoVec(data.data(), data.size());
  Status s = Run(IoOp::kWritev, Target(*f), 4096, {&v, 1});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.errno_value(), EBADF);
  EXPECT_NE(s.message().find(f->path), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("offset 4096"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(std::strerror(EBADF)), std::string::npos) << s.message();

  std::string name = "closed descriptor";
  IoTarget bad{987654, -1, false, &name, nullptr};
  Status r = Run(IoOp::kReadv, bad, 0, {&v, 1});
  EXPECT_EQ(r.errno_value(), EBADF);
  EXPECT_NE(r.message().find(name), std::string::npos);
  EXPECT_FALSE(Run(IoOp::kFdatasync, bad, 0, {}).ok());
}

TEST_P(IoEngineTest, RejectsRangesPastTheLargestOffsetWithoutStarting) {
  auto f = Open("big");
  char c = 0;
  iovec v = MakeIoVec(&c, 1);
  const auto before = engine_->stats().ops_submitted;
  Status s = Run(IoOp::kReadv, Target(*f), UINT64_MAX, {&v, 1});
  EXPECT_EQ(s.code(), ErrorCode::kOutOfRange);
  EXPECT_NE(s.message().find(f->path), std::string::npos);
  EXPECT_EQ(engine_->stats().ops_submitted, before);
}

TEST_P(IoEngineTest, ZeroLengthCompletesAtOnce) {
  auto f = Open("zero");
  EXPECT_TRUE(Run(IoOp::kReadv, Target(*f), 0, {}).ok());
}

TEST_P(IoEngineTest, PluggedSubmissionsStartTogetherAtTheOutermostUnplug) {
  auto f = Open("plug");
  std::vector<char> data(64 * 512, 'p');
  ASSERT_EQ(::pwrite(f->fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  constexpr int kOps = 32;
  std::vector<std::vector<char>> bufs(kOps, std::vector<char>(512));
  std::vector<iovec> iovs(kOps);
  Waiter w;
  const auto before = engine_->stats();
  PlugThisThread();
  PlugThisThread();  // nested: only the outer Unplug starts them
  for (int i = 0; i < kOps; ++i) {
    iovs[i] = MakeIoVec(bufs[i].data(), 512);
    engine_->Submit(IoOp::kReadv, Target(*f), i * 512, {&iovs[i], 1}, w.Callback());
  }
  UnplugThisThread();
  EXPECT_TRUE(ThisThreadPlugged());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(w.count(), 0u) << "plugged ops ran before the outermost Unplug";
  UnplugThisThread();
  EXPECT_FALSE(ThisThreadPlugged());
  for (const Status& s : w.Wait(kOps)) EXPECT_TRUE(s.ok()) << s.ToString();
  for (auto& b : bufs) EXPECT_EQ(b, std::vector<char>(512, 'p'));
  const auto after = engine_->stats();
  EXPECT_EQ(after.ops_submitted - before.ops_submitted, static_cast<uint64_t>(kOps));
  EXPECT_EQ(after.submit_calls - before.submit_calls, 1u);
}

TEST_P(IoEngineTest, FlushThisThreadLetsAPluggedThreadWaitForItsOwnIo) {
  auto f = Open("flush");
  char c = 0;
  iovec v = MakeIoVec(&c, 1);
  Waiter w;
  PlugThisThread();
  engine_->Submit(IoOp::kReadv, Target(*f), 0, {&v, 1}, w.Callback());
  EXPECT_FALSE(OnIoEngineThread());
  FlushThisThread();
  EXPECT_TRUE(ThisThreadPlugged());
  EXPECT_TRUE(w.Wait(1)[0].ok());  // would wait forever without the flush
  UnplugThisThread();
  Waiter on_engine;
  engine_->Submit(IoOp::kReadv, Target(*f), 0, {&v, 1}, [&](Status s) {
    EXPECT_TRUE(OnIoEngineThread());
    on_engine.Callback()(std::move(s));
  });
  EXPECT_TRUE(on_engine.Wait(1)[0].ok());
}

TEST_P(IoEngineTest, UnpluggedSubmissionsStartAtOnce) {
  auto f = Open("now");
  char c = 0;
  iovec v = MakeIoVec(&c, 1);
  const auto before = engine_->stats().submit_calls;
  EXPECT_TRUE(Run(IoOp::kReadv, Target(*f), 0, {&v, 1}).ok());
  EXPECT_TRUE(Run(IoOp::kReadv, Target(*f), 0, {&v, 1}).ok());
  EXPECT_EQ(engine_->stats().submit_calls - before, 2u);
}

// Several threads each own a region of one file and run batches of
// non-overlapping random writes, then random reads checked against their
// model of the region; at the end the whole file must equal the models.
TEST_P(IoEngineTest, ConcurrentRandomIoMatchesModel) {
  auto f = Open("model");
  constexpr int kThreads = 4, kRounds = 40, kBatch = 8;
  constexpr size_t kRegion = 256 * 1024;
  std::vector<std::vector<char>> model(kThreads, std::vector<char>(kRegion, 0));
  ASSERT_EQ(::ftruncate(f->fd, kThreads * kRegion), 0);
  std::atomic<int> failures{0};
  auto worker = [&](int t) {
    std::mt19937 rng(1234 + t);
    std::vector<char>& m = model[t];
    const uint64_t base = t * kRegion;
    for (int round = 0; round < kRounds; ++round) {
      // Writes: kBatch disjoint slots of kRegion / kBatch bytes, random
      // sub-range of each, split into up to 3 segments.
      std::vector<std::vector<char>> bufs(kBatch);
      std::vector<std::vector<iovec>> iovs(kBatch);
      Waiter w;
      if (round % 2) PlugThisThread();
      for (int i = 0; i < kBatch; ++i) {
        const size_t slot = kRegion / kBatch;
        size_t len = 1 + rng() % (slot - 1);
        size_t off = i * slot + rng() % (slot - len + 1);
        bufs[i].resize(len);
        for (auto& c : bufs[i]) c = static_cast<char>(rng());
        std::memcpy(&m[off], bufs[i].data(), len);
        size_t cut1 = rng() % (len + 1), cut2 = cut1 + rng() % (len - cut1 + 1);
        iovs[i] = {MakeIoVec(bufs[i].data(), cut1), MakeIoVec(bufs[i].data() + cut1, cut2 - cut1),
                   MakeIoVec(bufs[i].data() + cut2, len - cut2)};
        engine_->Submit(IoOp::kWritev, Target(*f), base + off, iovs[i], w.Callback());
      }
      if (round % 2) UnplugThisThread();
      for (const Status& s : w.Wait(kBatch))
        if (!s.ok()) ++failures;
      // Reads anywhere in the region (they may overlap each other).
      Waiter r;
      std::vector<std::pair<size_t, std::vector<char>>> reads(kBatch);
      std::vector<iovec> rv(kBatch);
      for (int i = 0; i < kBatch; ++i) {
        size_t len = 1 + rng() % 20000;
        size_t off = rng() % (kRegion - len);
        reads[i] = {off, std::vector<char>(len, '?')};
        rv[i] = MakeIoVec(reads[i].second.data(), len);
        engine_->Submit(IoOp::kReadv, Target(*f), base + off, {&rv[i], 1}, r.Callback());
      }
      for (const Status& s : r.Wait(kBatch))
        if (!s.ok()) ++failures;
      for (auto& [off, got] : reads)
        if (std::memcmp(got.data(), &m[off], got.size()) != 0) ++failures;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  std::vector<char> all(kThreads * kRegion);
  ASSERT_EQ(::pread(f->fd, all.data(), all.size(), 0), static_cast<ssize_t>(all.size()));
  for (int t = 0; t < kThreads; ++t)
    EXPECT_EQ(std::memcmp(all.data() + t * kRegion, model[t].data(), kRegion), 0) << "region " << t;
  const auto st = engine_->stats();
  EXPECT_EQ(st.completions, st.ops_submitted);
  EXPECT_GT(st.max_in_flight, 1u);
}

TEST_P(IoEngineTest, DestructionWaitsForOpsInFlight) {
  auto f = Open("drain");
  constexpr int kOps = 64;
  std::vector<char> data(256 * 1024, 'z');
  iovec v = MakeIoVec(data.data(), data.size());
  std::atomic<int> done{0};
  for (int i = 0; i < kOps; ++i)
    engine_->Submit(IoOp::kWritev, Target(*f), i * data.size(), {&v, 1}, [&](Status s) {
      EXPECT_TRUE(s.ok()) << s.ToString();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      ++done;
    });
  engine_.reset();
  EXPECT_EQ(done.load(), kOps);
  EXPECT_EQ(::lseek(f->fd, 0, SEEK_END), static_cast<off_t>(kOps * data.size()));
}

TEST_P(IoEngineTest, SubmitterThreadMayExitBeforeItsOpsComplete) {
  // io_uring may cancel what an exiting thread left with its I/O workers
  // (kernel-dependent); the engine must then start such ops again rather
  // than fail them. Either way every op completes, and completes OK.
  auto f = Open("exit");
  constexpr int kThreads = 8, kOps = 32;
  std::vector<char> data(64 * 1024, 'e');
  iovec v = MakeIoVec(data.data(), data.size());
  Waiter w;
  for (int t = 0; t < kThreads; ++t) {
    std::thread([&, t] {
      for (int i = 0; i < kOps; ++i)
        engine_->Submit(IoOp::kWritev, Target(*f), (t * kOps + i) * data.size(), {&v, 1}, w.Callback());
      engine_->Submit(IoOp::kFdatasync, Target(*f), 0, {}, w.Callback());
    }).join();
  }
  for (const Status& s : w.Wait(kThreads * (kOps + 1))) EXPECT_TRUE(s.ok()) << s.ToString();
  std::vector<char> back(kThreads * kOps * data.size());
  ASSERT_EQ(::pread(f->fd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  EXPECT_EQ(back, std::vector<char>(back.size(), 'e'));
}

TEST_P(IoEngineTest, BoundsOpsInFlightAndLetsCompletionsSubmitMore) {
  IoEngineOptions o;
  o.kind = GetParam();
  o.queue_depth = 4;
  auto e = IoEngine::Create(o);
  ASSERT_TRUE(e.ok());
  engine_ = std::move(e).value();
  auto f = Open("bound");
  std::vector<char> data(4096, 'q');
  iovec v = MakeIoVec(data.data(), data.size());
  // Each of 40 outside ops is followed, from its completion, by a chain of 3
  // more: the completion side never waits for room, so this cannot deadlock.
  constexpr int kOps = 40, kChain = 3;
  std::atomic<int> done{0};
  IoEngine* engine = engine_.get();
  std::vector<std::vector<char>> rbufs(kOps, std::vector<char>(4096));
  std::vector<iovec> riov(kOps);
  for (int i = 0; i < kOps; ++i) riov[i] = MakeIoVec(rbufs[i].data(), 4096);
  std::function<void(int, int, Status)> step = [&](int i, int left, Status s) {
    EXPECT_TRUE(s.ok());
    if (left == 0) {
      ++done;
      return;
    }
    engine->Submit(IoOp::kReadv, Target(*f), i * 4096, {&riov[i], 1},
                   [&, i, left](Status s2) { step(i, left - 1, s2); });
  };
  for (int i = 0; i < kOps; ++i)
    engine->Submit(IoOp::kWritev, Target(*f), i * 4096, {&v, 1}, [&, i](Status s) { step(i, kChain, s); });
  // The chains are still running: destruction waits for them, and what their
  // completions submit meanwhile still starts.
  engine_.reset();
  EXPECT_EQ(done.load(), kOps);
  for (auto& r : rbufs) EXPECT_EQ(r, data);
}

TEST_P(IoEngineTest, SubmittersWaitForRoomBeyondTheQueueDepth) {
  IoEngineOptions o;
  o.kind = GetParam();
  o.queue_depth = 4;
  auto e = IoEngine::Create(o);
  ASSERT_TRUE(e.ok());
  auto f = Open("room");
  std::vector<char> data(64 * 1024, 'r');
  iovec v = MakeIoVec(data.data(), data.size());
  Waiter w;
  for (int i = 0; i < 100; ++i) (*e)->Submit(IoOp::kWritev, Target(*f), i * data.size(), {&v, 1}, w.Callback());
  for (const Status& s : w.Wait(100)) EXPECT_TRUE(s.ok());
  const auto st = (*e)->stats();
  EXPECT_LE(st.max_in_flight, 4u);
  EXPECT_GT(st.space_waits, 0u);
}

TEST_P(IoEngineTest, PluggedSubmitterBeyondTheQueueDepthStartsItsOwnOpsInsteadOfDeadlocking) {
  IoEngineOptions o;
  o.kind = GetParam();
  o.queue_depth = 4;
  auto e = IoEngine::Create(o);
  ASSERT_TRUE(e.ok());
  auto f = Open("plugfull");
  std::vector<char> data(4096, 'f');
  iovec v = MakeIoVec(data.data(), data.size());
  Waiter w;
  PlugThisThread();
  for (int i = 0; i < 50; ++i) (*e)->Submit(IoOp::kWritev, Target(*f), i * 4096, {&v, 1}, w.Callback());
  UnplugThisThread();
  for (const Status& s : w.Wait(50)) EXPECT_TRUE(s.ok());
  EXPECT_GT((*e)->stats().space_waits, 0u);
}

TEST_P(IoEngineTest, CompletionMaySubmitMoreThanTheSubmissionQueueHolds) {
  IoEngineOptions o;
  o.kind = GetParam();
  o.queue_depth = 4;
  auto e = IoEngine::Create(o);
  ASSERT_TRUE(e.ok());
  IoEngine* engine = e->get();
  auto f = Open("fanout");
  std::vector<char> data(32 * 4096, 'o');
  ASSERT_EQ(::pwrite(f->fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  std::vector<std::vector<char>> bufs(32, std::vector<char>(4096));
  std::vector<iovec> iovs(32);
  Waiter w;
  char c;
  iovec first = MakeIoVec(&c, 1);
  engine->Submit(IoOp::kReadv, Target(*f), 0, {&first, 1}, [&](Status s) {
    EXPECT_TRUE(s.ok());
    for (int i = 0; i < 32; ++i) {  // 32 > the 4 entries of the queue
      iovs[i] = MakeIoVec(bufs[i].data(), 4096);
      engine->Submit(IoOp::kReadv, Target(*f), i * 4096, {&iovs[i], 1}, w.Callback());
    }
  });
  for (const Status& s : w.Wait(32)) EXPECT_TRUE(s.ok());
  for (auto& b : bufs) EXPECT_EQ(b, std::vector<char>(4096, 'o'));
  EXPECT_GT(engine->stats().max_in_flight, 4u);  // the completion side does not wait for room
}

TEST_P(IoEngineTest, RegisteredFilesCarryIo) {
  auto f = Open("fixed");
  int slot = engine_->RegisterFile(f->fd);
  if (engine_->kind() == IoEngineKind::kThreads) {
    EXPECT_EQ(slot, -1);
    return;
  }
  ASSERT_GE(slot, 0);
  IoTarget t{f->fd, slot, false, &f->path, nullptr};
  std::string data = "registered";
  iovec v = MakeIoVec(data.data(), data.size());
  ASSERT_TRUE(Run(IoOp::kWritev, t, 7, {&v, 1}).ok());
  std::string got(data.size(), '?');
  iovec g = MakeIoVec(got.data(), got.size());
  ASSERT_TRUE(Run(IoOp::kReadv, t, 7, {&g, 1}).ok());
  EXPECT_EQ(got, data);
  EXPECT_TRUE(Run(IoOp::kFdatasync, t, 0, {}).ok());
  engine_->UnregisterFile(slot);
  EXPECT_EQ(engine_->RegisterFile(f->fd), slot);  // the slot is free again
}

TEST_P(IoEngineTest, TrackerCountsTheFilesOpsInFlight) {
  auto f = Open("track");
  IoTracker tracker;
  IoTarget t{f->fd, -1, false, &f->path, &tracker};
  std::vector<char> data(1 << 20, 't');
  iovec v = MakeIoVec(data.data(), data.size());
  std::atomic<int> done{0};
  for (int i = 0; i < 16; ++i)
    engine_->Submit(IoOp::kWritev, t, i * data.size(), {&v, 1}, [&](Status s) {
      EXPECT_TRUE(s.ok());
      ++done;
    });
  tracker.WaitIdle();
  // Every op's outcome is known; its completion may still be running.
  engine_.reset();
  EXPECT_EQ(done.load(), 16);
}

// PosixFile's Submit* forms on an engine of the mode under test.
TEST_P(IoEngineTest, PosixFileSubmitsAlignedDirectIoToTheEngine) {
  FileOpenOptions fo;
  fo.create = true;
  fo.direct = true;
  fo.io_engine = engine_.get();
  const std::string path = dir_.path() + "/direct";
  auto opened = DefaultFileSystem()->Open(path, fo);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<File> file = std::move(opened).value();
  constexpr size_t kLen = 64 * 1024;
  void* raw = nullptr;
  ASSERT_EQ(::posix_memalign(&raw, 4096, 2 * kLen), 0);
  std::unique_ptr<char, decltype(&std::free)> mem(static_cast<char*>(raw), &std::free);
  char* out = mem.get();
  char* in = mem.get() + kLen;
  for (size_t i = 0; i < kLen; ++i) out[i] = static_cast<char>(i % 251);

  auto before = engine_->stats().ops_submitted;
  Waiter w;
  iovec wv[] = {MakeIoVec(out, kLen / 2), MakeIoVec(out + kLen / 2, kLen / 2)};
  file->SubmitWritev(8192, wv, w.Callback());
  ASSERT_TRUE(w.Wait(1)[0].ok());
  file->SubmitFlush(w.Callback());
  ASSERT_TRUE(w.Wait(2)[1].ok());
  iovec rv = MakeIoVec(in, kLen);
  file->SubmitReadv(8192, {&rv, 1}, w.Callback());
  ASSERT_TRUE(w.Wait(3)[2].ok());
  EXPECT_EQ(std::memcmp(in, out, kLen), 0);
  EXPECT_EQ(engine_->stats().ops_submitted - before, 3u);

  // Unaligned for O_DIRECT: served correctly (synchronously, bounced).
  before = engine_->stats().ops_submitted;
  std::string odd(1000, 'o');
  iovec ov = MakeIoVec(odd.data(), odd.size());
  file->SubmitWritev(8192 + 100, {&ov, 1}, w.Callback());
  ASSERT_TRUE(w.Wait(4)[3].ok());
  std::string back(1200, '?');
  iovec bv = MakeIoVec(back.data(), back.size());
  file->SubmitReadv(8192, {&bv, 1}, w.Callback());
  ASSERT_TRUE(w.Wait(5)[4].ok());
  EXPECT_EQ(std::memcmp(back.data(), out, 100), 0);
  EXPECT_EQ(back.substr(100, 1000), odd);
  EXPECT_EQ(std::memcmp(back.data() + 1100, out + 1100, 100), 0);
  EXPECT_EQ(engine_->stats().ops_submitted, before);
  EXPECT_EQ(*file->Size(), 8192 + kLen);
}

TEST_P(IoEngineTest, PosixFileDirectReadAtAnUnalignedEndOfFileFillsZeros) {
  const std::string path = dir_.path() + "/short";
  {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    std::string data(5000, 's');
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), 5000);
    ::close(fd);
  }
  FileOpenOptions fo;
  fo.direct = true;
  fo.io_engine = engine_.get();
  auto file = std::move(DefaultFileSystem()->Open(path, fo)).value();
  void* raw = nullptr;
  ASSERT_EQ(::posix_memalign(&raw, 4096, 8192), 0);
  std::unique_ptr<char, decltype(&std::free)> mem(static_cast<char*>(raw), &std::free);
  std::memset(mem.get(), '?', 8192);
  iovec v = MakeIoVec(mem.get(), 8192);
  Waiter w;
  file->SubmitReadv(0, {&v, 1}, w.Callback());
  Status s = w.Wait(1)[0];
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(std::string(mem.get(), 5000), std::string(5000, 's'));
  EXPECT_EQ(std::string(mem.get() + 5000, 3192), std::string(3192, '\0'));
  // The synchronous form agrees.
  std::memset(mem.get(), '?', 8192);
  ASSERT_TRUE(file->ReadAt(0, {reinterpret_cast<uint8_t*>(mem.get()), 8192}).ok());
  EXPECT_EQ(std::string(mem.get() + 5000, 3192), std::string(3192, '\0'));
}

// Unaligned synchronous writes (bounced read-modify-write at the file's
// direct-I/O granule), aligned asynchronous writes and reads of both kinds on
// one O_DIRECT file, one at a time, against a model of its bytes and size.
TEST_P(IoEngineTest, PosixFileDirectIoOfEveryShapeMatchesModel) {
  const std::string path = dir_.path() + "/mixed";
  FileOpenOptions fo;
  fo.create = true;
  fo.direct = true;
  fo.io_engine = engine_.get();
  auto file = std::move(DefaultFileSystem()->Open(path, fo)).value();
  std::vector<uint8_t> model;
  std::mt19937 rng(99);
  void* raw = nullptr;
  ASSERT_EQ(::posix_memalign(&raw, 4096, 256 * 1024), 0);
  std::unique_ptr<char, decltype(&std::free)> mem(static_cast<char*>(raw), &std::free);
  auto* buf = reinterpret_cast<uint8_t*>(mem.get());
  for (int i = 0; i < 300; ++i) {
    const bool aligned = rng() % 2;
    const uint64_t off = aligned ? (rng() % 64) * 4096 : rng() % (256 * 1024);
    const size_t len = aligned ? (1 + rng() % 16) * 4096 : 1 + rng() % 10000;
    switch (rng() % 3) {
      case 0: {  // write
        for (size_t k = 0; k < len; ++k) buf[k] = static_cast<uint8_t>(rng());
        if (model.size() < off + len) model.resize(off + len, 0);
        std::memcpy(model.data() + off, buf, len);
        iovec v = MakeIoVec(buf, len);
        Waiter w;
        if (rng() % 2) {
          file->SubmitWritev(off, {&v, 1}, w.Callback());
          ASSERT_TRUE(w.Wait(1)[0].ok());
        } else {
          ASSERT_TRUE(file->WriteAt(off, {buf, len}).ok());
        }
        break;
      }
      default: {  // read (past the end reads zeros)
        iovec v = MakeIoVec(buf, len);
        Waiter w;
        if (rng() % 2) {
          file->SubmitReadv(off, {&v, 1}, w.Callback());
          ASSERT_TRUE(w.Wait(1)[0].ok());
        } else {
          ASSERT_TRUE(file->ReadAt(off, {buf, len}).ok());
        }
        for (size_t k = 0; k < len; ++k) {
          const uint8_t want = off + k < model.size() ? model[off + k] : 0;
          ASSERT_EQ(buf[k], want) << "op " << i << " offset " << off + k;
        }
      }
    }
    ASSERT_EQ(*file->Size(), model.size()) << "op " << i;
  }
}

TEST_P(IoEngineTest, PosixFileDestructionWaitsForItsOps) {
  const std::string path = dir_.path() + "/close";
  FileOpenOptions fo;
  fo.create = true;
  fo.io_engine = engine_.get();
  auto file = std::move(DefaultFileSystem()->Open(path, fo)).value();
  std::vector<char> data(512 * 1024, 'c');
  iovec v = MakeIoVec(data.data(), data.size());
  std::atomic<int> ok{0};
  for (int i = 0; i < 32; ++i) file->SubmitWritev(i * data.size(), {&v, 1}, [&](Status s) { ok += s.ok(); });
  file.reset();  // must not close the descriptor under the writes
  engine_.reset();
  EXPECT_EQ(ok.load(), 32);
  std::vector<char> back(32 * data.size());
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_EQ(::pread(fd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  ::close(fd);
  EXPECT_EQ(back, std::vector<char>(back.size(), 'c'));
}

std::string ModeName(const ::testing::TestParamInfo<IoEngineKind>& p) {
  return p.param == IoEngineKind::kUring ? "Uring" : "Threads";
}

INSTANTIATE_TEST_SUITE_P(Modes, IoEngineTest, ::testing::Values(IoEngineKind::kUring, IoEngineKind::kThreads),
                         ModeName);

TEST(IoEngineFallbackTest, FallsBackToThreadsWhenIoUringCannotStart) {
  IoEngineOptions o;
  o.kind = IoEngineKind::kUring;  // not kAuto, which COWTAP_IO_ENGINE may already steer
  o.simulate_uring_init_errno = ENOSYS;
  auto e = IoEngine::Create(o);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ((*e)->kind(), IoEngineKind::kThreads);
  EXPECT_NE((*e)->fallback_reason().find("io_uring_queue_init"), std::string::npos) << (*e)->fallback_reason();
  TempDir dir;
  std::string path = dir.path() + "/fb";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  std::string data = "fallback";
  iovec v = MakeIoVec(data.data(), data.size());
  Waiter w;
  (*e)->Submit(IoOp::kWritev, IoTarget{fd, -1, false, &path, nullptr}, 0, {&v, 1}, w.Callback());
  EXPECT_TRUE(w.Wait(1)[0].ok());
  char buf[8];
  EXPECT_EQ(::pread(fd, buf, 8, 0), 8);
  EXPECT_EQ(std::string(buf, 8), data);
  ::close(fd);
}

TEST(IoEngineFallbackTest, EnvironmentForcesTheThreadsMode) {
  const char* was = std::getenv("COWTAP_IO_ENGINE");
  const std::string saved = was ? was : "";
  ::setenv("COWTAP_IO_ENGINE", "threads", 1);
  auto e = IoEngine::Create();
  if (was) {
    ::setenv("COWTAP_IO_ENGINE", saved.c_str(), 1);
  } else {
    ::unsetenv("COWTAP_IO_ENGINE");
  }
  ASSERT_TRUE(e.ok());
  EXPECT_EQ((*e)->kind(), IoEngineKind::kThreads);
  EXPECT_EQ((*e)->fallback_reason(), "COWTAP_IO_ENGINE=threads");
}

}  // namespace
}  // namespace cowtap::cow
