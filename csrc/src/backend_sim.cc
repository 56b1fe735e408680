// The asynchronous device model (see backend_sim.h): stream threads, events as marks in those
// streams, a modelled clock, copies that take time and kernels that read memory at their turn.
#include "moert/backend_sim.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "moert/common.h"

namespace moert {

void SimConfig::check() const {
  MOERT_CHECK(std::isfinite(bandwidth_gbs) && bandwidth_gbs > 0,
              "sim bandwidth_gbs=", bandwidth_gbs, " must be a positive number of GB/s");
  MOERT_CHECK(std::isfinite(latency_us) && latency_us >= 0, "sim latency_us=", latency_us,
              " must be a number of microseconds >= 0");
  MOERT_CHECK(std::isfinite(jitter_us) && jitter_us >= 0, "sim jitter_us=", jitter_us,
              " must be a number of microseconds >= 0");
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::size_t kPiece = std::size_t{1} << 20;  // a copy lands in pieces of this size

// One event's records: `recorded` counts record() calls (host side), `completed` is the newest
// record a stream has reached; `done` remembers when recent records completed, in completion
// order, so a wait on an older record is charged that record's time, not a newer one's.
struct EventState {
  std::uint64_t recorded = 0;
  std::uint64_t completed = 0;
  double time = 0.0;  // device time at which `completed` was reached
  std::deque<std::pair<std::uint64_t, double>> done;
  bool timing = false;
  std::uint64_t error_gen = 0;  // the record that completed after a failed copy (fault plan)
  std::string error;

  // Device time at which the record `target` (or a later one) completed.
  double time_of(std::uint64_t target) const {
    for (const auto& [gen, t] : done) {
      if (gen >= target) return t;
    }
    return time;
  }
};

struct Op {
  enum Kind { kCopy, kRecord, kWait, kRead, kSleep };
  explicit Op(Kind k) : kind(k) {}
  Kind kind;
  double enqueued = 0.0;
  void* dst = nullptr;
  const void* src = nullptr;
  std::size_t bytes = 0;
  std::shared_ptr<EventState> event;
  std::uint64_t gen = 0;
  double seconds = 0.0;
  std::int64_t read = -1;
  CopyFault fault;  // copies under the test fault plan
};

struct Stream {
  std::deque<Op> ops;  // the running operation stays at the front until it is done
  double cursor = 0.0;
  bool stop = false;
  std::string error;  // a failed copy's, until the next record on the stream reports it
  std::mt19937_64 rng;
  std::thread thread;
};

}  // namespace

struct SimBackend::Core {
  SimConfig cfg;
  Clock::time_point epoch = Clock::now();
  mutable std::mutex mu;
  std::condition_variable cv;  // any stream, event or read changed
  std::map<StreamHandle, std::unique_ptr<Stream>> streams;
  StreamHandle next_handle = 1;
  std::vector<SimRead> reads;

  double now() const { return std::chrono::duration<double>(Clock::now() - epoch).count(); }
  void sleep_until(double t) const {
    std::this_thread::sleep_until(
        epoch + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(t)));
  }
  double copy_seconds(std::size_t bytes) const {
    return cfg.latency_us * 1e-6 + static_cast<double>(bytes) / (cfg.bandwidth_gbs * 1e9);
  }
  double jitter(Stream& s) const {
    if (cfg.jitter_us <= 0) return 0.0;
    return std::uniform_real_distribution<double>(0.0, cfg.jitter_us * 1e-6)(s.rng);
  }

  Stream& stream_locked(StreamHandle h, const char* what) {
    auto it = streams.find(h);
    MOERT_CHECK(it != streams.end(), "sim ", what, ": stream ", h,
                " is not a stream of this device (created by create_stream and not destroyed)");
    return *it->second;
  }
  void enqueue(StreamHandle h, Op op, const char* what) {
    std::lock_guard<std::mutex> lock(mu);
    Stream& s = stream_locked(h, what);
    op.enqueued = now();
    s.ops.push_back(std::move(op));
    cv.notify_all();
  }
  void complete_locked(EventState& ev, std::uint64_t gen, double t) {
    if (gen > ev.completed) {
      ev.completed = gen;
      ev.time = t;
    }
    ev.done.emplace_back(gen, t);
    if (ev.done.size() > 64) ev.done.pop_front();
    cv.notify_all();
  }
  // Copies `bytes` in pieces, the last one landing at `end`, each one at its share of the transfer.
  void land(const Op& op, double start, double end) const {
    const std::size_t pieces = std::max<std::size_t>(1, (op.bytes + kPiece - 1) / kPiece);
    const double xfer_start = end - static_cast<double>(op.bytes) / (cfg.bandwidth_gbs * 1e9);
    for (std::size_t i = 0; i < pieces; ++i) {
      const std::size_t lo = i * op.bytes / pieces;
      const std::size_t hi = (i + 1) * op.bytes / pieces;
      sleep_until(std::max(start, xfer_start + (end - xfer_start) * static_cast<double>(i + 1) /
                                                   static_cast<double>(pieces)));
      std::memcpy(static_cast<std::uint8_t*>(op.dst) + lo,
                  static_cast<const std::uint8_t*>(op.src) + lo, hi - lo);
    }
  }

  void run(Stream& s);
};

void SimBackend::Core::run(Stream& s) {
  std::unique_lock<std::mutex> lk(mu);
  while (true) {
    cv.wait(lk, [&] { return s.stop || !s.ops.empty(); });
    if (s.ops.empty()) return;  // stopped and drained
    const Op op = s.ops.front();
    double start = std::max(s.cursor, op.enqueued);
    if (op.kind == Op::kWait) {
      cv.wait(lk, [&] { return op.event->completed >= op.gen; });
      start = std::max(start, op.event->time_of(op.gen));
    }
    start += jitter(s);
    double end = start;
    SimRead seen;
    lk.unlock();
    switch (op.kind) {
      case Op::kCopy:
        end = start + copy_seconds(op.bytes) * op.fault.slow;
        if (op.fault.fail) {
          sleep_until(end);  // nothing lands
        } else {
          land(op, start, end);
        }
        break;
      case Op::kRead:
        end = start + op.seconds;
        sleep_until(start);
        seen.checksum_start = SimBackend::checksum(op.src, op.bytes);
        sleep_until(end);
        seen.checksum_end = SimBackend::checksum(op.src, op.bytes);
        break;
      case Op::kSleep:
        end = start + op.seconds;
        sleep_until(end);
        break;
      case Op::kRecord:
      case Op::kWait:
        sleep_until(start);
        break;
    }
    lk.lock();
    s.cursor = end;
    if (op.kind == Op::kCopy && op.fault.fail) {
      s.error = cat("injected fault: copy #", op.fault.index, " failed on its stream");
    }
    if (op.kind == Op::kRecord && !s.error.empty()) {
      op.event->error_gen = op.gen;
      op.event->error = std::move(s.error);
      s.error.clear();
    }
    if (op.kind == Op::kRecord) complete_locked(*op.event, op.gen, end);
    if (op.kind == Op::kRead) {
      seen.done = true;
      seen.start_s = start;
      seen.end_s = end;
      reads[static_cast<std::size_t>(op.read)] = seen;
    }
    s.ops.pop_front();
    cv.notify_all();
  }
}

namespace {

class SimEvent final : public Event {
 public:
  SimEvent(std::shared_ptr<SimBackend::Core> core, bool timing)
      : core_(std::move(core)), state_(std::make_shared<EventState>()) {
    state_->timing = timing;
  }
  void record(StreamHandle s) override {
    if (s == 0) {  // the host: everything it asked for is done
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->complete_locked(*state_, ++state_->recorded, core_->now());
      return;
    }
    Op op(Op::kRecord);
    op.event = state_;
    std::lock_guard<std::mutex> lock(core_->mu);
    Stream& st = core_->stream_locked(s, "Event.record");
    op.gen = ++state_->recorded;
    op.enqueued = core_->now();
    st.ops.push_back(std::move(op));
    core_->cv.notify_all();
  }
  void wait(StreamHandle s) override {
    if (s == 0) {
      synchronize();
      return;
    }
    std::lock_guard<std::mutex> lock(core_->mu);
    Stream& st = core_->stream_locked(s, "Event.wait");
    if (state_->completed >= state_->recorded) return;  // nothing to wait for
    Op op(Op::kWait);
    op.event = state_;
    op.gen = state_->recorded;
    op.enqueued = core_->now();
    st.ops.push_back(std::move(op));
    core_->cv.notify_all();
  }
  void synchronize() override {
    std::unique_lock<std::mutex> lk(core_->mu);
    const std::uint64_t target = state_->recorded;
    core_->cv.wait(lk, [&] { return state_->completed >= target; });
    if (target > 0 && state_->error_gen == target) throw RuntimeFailure(state_->error);
  }
  bool query() override {
    std::lock_guard<std::mutex> lock(core_->mu);
    return state_->completed >= state_->recorded;
  }
  double seconds_since(Event& start) override {
    auto* from = dynamic_cast<SimEvent*>(&start);
    if (from == nullptr || !state_->timing || !from->state_->timing) {
      throw RuntimeFailure("seconds_since needs two timing events of the sim backend");
    }
    std::lock_guard<std::mutex> lock(core_->mu);
    const EventState& a = *from->state_;
    const EventState& b = *state_;
    if (a.recorded == 0 || b.recorded == 0 || a.completed < a.recorded ||
        b.completed < b.recorded) {
      throw RuntimeFailure("seconds_since: both events must be recorded and complete");
    }
    return b.time - a.time;
  }

 private:
  std::shared_ptr<SimBackend::Core> core_;
  std::shared_ptr<EventState> state_;
};

}  // namespace

SimBackend::SimBackend(const SimConfig& config) : core_(std::make_shared<Core>()) {
  config.check();
  core_->cfg = config;
}

SimBackend::~SimBackend() {
  std::vector<StreamHandle> handles;
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    for (const auto& kv : core_->streams) handles.push_back(kv.first);
  }
  for (StreamHandle h : handles) destroy_stream(h);
}

const SimConfig& SimBackend::config() const { return core_->cfg; }
double SimBackend::now() const { return core_->now(); }
double SimBackend::copy_seconds(std::size_t bytes) const { return core_->copy_seconds(bytes); }

void* SimBackend::alloc(std::size_t bytes) { return alloc_host_pages(bytes); }

void SimBackend::free(void* p, std::size_t bytes) noexcept {
  synchronize();  // no copy or read may still touch the memory
  free_host_pages(p, bytes);
}

StreamHandle SimBackend::create_stream() {
  std::lock_guard<std::mutex> lock(core_->mu);
  const StreamHandle h = core_->next_handle++;
  auto s = std::make_unique<Stream>();
  s->rng.seed(core_->cfg.seed * 0x9E3779B97F4A7C15ull + h);
  s->cursor = core_->now();
  Stream* raw = s.get();
  core_->streams.emplace(h, std::move(s));
  Core* core = core_.get();
  raw->thread = std::thread([core, raw] { core->run(*raw); });
  return h;
}

void SimBackend::destroy_stream(StreamHandle h) noexcept {
  Stream* raw = nullptr;
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    auto it = core_->streams.find(h);
    if (it == core_->streams.end()) return;
    raw = it->second.get();
    raw->stop = true;  // its queued work still runs (cudaStreamDestroy does the same)
    core_->cv.notify_all();
  }
  if (raw->thread.joinable()) raw->thread.join();
  std::lock_guard<std::mutex> lock(core_->mu);
  core_->streams.erase(h);
}

void SimBackend::copy_async(void* dst, const void* src, std::size_t bytes, StreamHandle s) {
  MOERT_CHECK(dst != nullptr && src != nullptr, "sim copy: null address (dst ", dst, ", src ", src,
              ")");
  if (s == 0) {  // the host copies itself, taking the modelled time
    Op op(Op::kCopy);
    op.dst = dst;
    op.src = src;
    op.bytes = bytes;
    const double start = core_->now();
    core_->land(op, start, start + core_->copy_seconds(bytes));
    return;
  }
  Op op(Op::kCopy);
  op.dst = dst;
  op.src = src;
  op.bytes = bytes;
  core_->enqueue(s, std::move(op), "copy");
}

void SimBackend::copy_async_faulty(void* dst, const void* src, std::size_t bytes, StreamHandle s,
                                   const CopyFault& fault) {
  if (s == 0) {  // the host's own copy fails at once, or takes longer
    if (fault.fail) throw RuntimeFailure(cat("injected fault: copy #", fault.index, " failed"));
    Op op(Op::kCopy);
    op.dst = dst;
    op.src = src;
    op.bytes = bytes;
    const double start = core_->now();
    core_->land(op, start, start + core_->copy_seconds(bytes) * fault.slow);
    return;
  }
  MOERT_CHECK(dst != nullptr && src != nullptr, "sim copy: null address (dst ", dst, ", src ", src,
              ")");
  Op op(Op::kCopy);
  op.dst = dst;
  op.src = src;
  op.bytes = bytes;
  op.fault = fault;
  core_->enqueue(s, std::move(op), "copy");
}

void SimBackend::synchronize_stream(StreamHandle h) {
  if (h == 0) return;
  std::unique_lock<std::mutex> lk(core_->mu);
  Stream& s = core_->stream_locked(h, "synchronize");
  core_->cv.wait(lk, [&] { return s.ops.empty(); });
}

void SimBackend::synchronize() {
  std::unique_lock<std::mutex> lk(core_->mu);
  core_->cv.wait(lk, [&] {
    for (const auto& kv : core_->streams) {
      if (!kv.second->ops.empty()) return false;
    }
    return true;
  });
}

std::unique_ptr<Event> SimBackend::create_event() {
  return std::make_unique<SimEvent>(core_, false);
}

std::unique_ptr<Event> SimBackend::create_timing_event() {
  return std::make_unique<SimEvent>(core_, true);
}

std::int64_t SimBackend::enqueue_read(StreamHandle s, const void* p, std::size_t bytes,
                                      double seconds) {
  MOERT_CHECK(p != nullptr, "sim enqueue_read: null address");
  MOERT_CHECK(std::isfinite(seconds) && seconds >= 0, "sim enqueue_read: seconds=", seconds,
              " must be >= 0");
  std::int64_t ticket = 0;
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    if (s != 0) core_->stream_locked(s, "enqueue_read");
    ticket = static_cast<std::int64_t>(core_->reads.size());
    core_->reads.emplace_back();
  }
  if (s == 0) {  // the host reads now
    SimRead seen;
    seen.start_s = core_->now();
    seen.checksum_start = checksum(p, bytes);
    core_->sleep_until(seen.start_s + seconds);
    seen.checksum_end = checksum(p, bytes);
    seen.end_s = core_->now();
    seen.done = true;
    std::lock_guard<std::mutex> lock(core_->mu);
    core_->reads[static_cast<std::size_t>(ticket)] = seen;
    return ticket;
  }
  Op op(Op::kRead);
  op.src = p;
  op.bytes = bytes;
  op.seconds = seconds;
  op.read = ticket;
  core_->enqueue(s, std::move(op), "enqueue_read");
  return ticket;
}

SimRead SimBackend::read_result(std::int64_t ticket) {
  std::lock_guard<std::mutex> lock(core_->mu);
  MOERT_CHECK(ticket >= 0 && static_cast<std::size_t>(ticket) < core_->reads.size(),
              "sim read_result: ticket ", ticket, " was never issued");
  return core_->reads[static_cast<std::size_t>(ticket)];
}

void SimBackend::enqueue_sleep(StreamHandle s, double seconds) {
  MOERT_CHECK(std::isfinite(seconds) && seconds >= 0, "sim enqueue_sleep: seconds=", seconds,
              " must be >= 0");
  if (s == 0) {
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    return;
  }
  Op op(Op::kSleep);
  op.seconds = seconds;
  core_->enqueue(s, std::move(op), "enqueue_sleep");
}

std::uint64_t SimBackend::checksum(const void* p, std::size_t bytes) {
  // FNV-1a over 8-byte words, then the tail bytes: cheap, and any changed byte changes it.
  const auto* b = static_cast<const std::uint8_t*>(p);
  std::uint64_t h = 0xcbf29ce484222325ull;
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, b + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
  }
  for (; i < bytes; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h ^ bytes;
}

}  // namespace moert
