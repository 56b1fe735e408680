// A fake CUDA driver for CI: the driver API entry points moert's CUDA backend calls, on host
// memory, so that the real backend code (csrc/src/backend_cuda.cc) runs without a GPU. Loaded
// with MOERT_LIBCUDA=<this library>; built by tests/fake_cuda/__init__.py with the system compiler.
//
// - "Device memory" is host memory (cuMemAlloc); copies and memsets are checked against it.
// - Every stream is a FIFO run by its own thread; an event completes when its stream reaches it;
//   cuStreamWaitEvent blocks the stream until the event's latest record completes.
// - Copies and memsets take latency + bytes / bandwidth (sleeping) and move the bytes at their end,
//   plus up to `jitter` before every operation (seeded per stream): ordering bugs show.
// - Contexts: one primary context per device (FAKE_CUDA_DEVICES, default 1); calls that need a
//   current context fail with CUDA_ERROR_INVALID_CONTEXT without one, and a copy on a stream of
//   another context than the current one with CUDA_ERROR_INVALID_HANDLE (counted in ctx_errors).
// - cuDriverGetVersion answers FAKE_CUDA_DRIVER_VERSION (default 13000), read at every call.
// - Test hooks (fakecu_*): timing, streams and events without a current context, modelled
//   kernels that checksum device memory at their start and end, counters.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using Clock = std::chrono::steady_clock;
using CUresult = int;
using CUdeviceptr = unsigned long long;
constexpr CUresult kOk = 0, kInvalidValue = 1, kNotInitialized = 3, kInvalidDevice = 101,
                   kInvalidContext = 201, kInvalidHandle = 400, kNotReady = 600,
                   kAlreadyRegistered = 712, kNotRegistered = 713;
constexpr unsigned kDisableTiming = 0x2;

struct Ctx;

struct Stream {
  Ctx* ctx = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> q;
  std::uint64_t pushed = 0, done = 0;
  bool stop = false;
  std::mt19937_64 rng;
  std::thread th;
};

struct Ctx {
  int device = 0;
  int refs = 0;
  Stream* null_stream = nullptr;  // the legacy default stream (handle 0), made on first use
};

struct Event {
  Ctx* ctx = nullptr;
  unsigned flags = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::uint64_t recorded = 0, completed = 0;
  Clock::time_point at;
};

struct Read {
  bool done = false;
  double start_s = 0, end_s = 0;
  std::uint64_t checksum_start = 0, checksum_end = 0;
};

struct State {
  std::mutex mu;
  bool initialized = false;
  std::vector<Ctx*> ctxs;
  std::set<Stream*> streams;
  std::vector<Stream*> destroyed;  // kept (never freed) so that cuMemFree can still drain them
  std::map<std::uintptr_t, std::size_t> allocs, registered;
  std::map<std::uintptr_t, int> alloc_device;  // the device of each allocation's context
  double bandwidth_gbs = 25.0, latency_us = 10.0, jitter_us = 0.0;
  std::uint64_t seed = 0, streams_made = 0;
  std::vector<Read> reads;
  std::int64_t copies = 0, memsets = 0, ctx_errors = 0;
  Clock::time_point t0 = Clock::now();
};

State& S() {
  static State* s = new State();  // never destroyed: stream threads may outlive static teardown
  return *s;
}

thread_local Ctx* current = nullptr;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? std::atoi(v) : fallback;
}

int device_count() { return std::max(0, env_int("FAKE_CUDA_DEVICES", 1)); }

double since_t0(Clock::time_point t) { return std::chrono::duration<double>(t - S().t0).count(); }

void sleep_s(double s) {
  if (s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(s));
}

std::uint64_t checksum(const void* p, std::size_t bytes) {  // SimBackend::checksum's FNV-1a
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

void run_stream(Stream* s) {
  std::unique_lock<std::mutex> lk(s->mu);
  while (true) {
    s->cv.wait(lk, [&] { return !s->q.empty() || s->stop; });
    if (s->q.empty()) return;  // destroyed and drained (the Stream is kept: see cuStreamDestroy)
    std::function<void()> op = std::move(s->q.front());
    s->q.pop_front();
    double jitter = 0;
    {
      std::lock_guard<std::mutex> lock(S().mu);
      jitter = S().jitter_us;
    }
    const double delay = jitter > 0 ? std::uniform_real_distribution<double>(0, jitter)(s->rng) : 0;
    lk.unlock();
    sleep_s(delay * 1e-6);
    op();
    lk.lock();
    ++s->done;
    s->cv.notify_all();
  }
}

Stream* new_stream(Ctx* ctx) {
  auto* s = new Stream();
  s->ctx = ctx;
  {
    std::lock_guard<std::mutex> lock(S().mu);
    s->rng.seed(S().seed * 1000003 + S().streams_made++);
    S().streams.insert(s);
  }
  s->th = std::thread(run_stream, s);
  return s;
}

void push(Stream* s, std::function<void()> op) {
  std::lock_guard<std::mutex> lock(s->mu);
  s->q.push_back(std::move(op));
  ++s->pushed;
  s->cv.notify_all();
}

void drain(Stream* s) {
  std::unique_lock<std::mutex> lk(s->mu);
  const std::uint64_t target = s->pushed;
  s->cv.wait(lk, [&] { return s->done >= target; });
}

void drain_all() {
  std::vector<Stream*> all;
  {
    std::lock_guard<std::mutex> lock(S().mu);
    all.assign(S().streams.begin(), S().streams.end());
    all.insert(all.end(), S().destroyed.begin(), S().destroyed.end());
  }
  for (Stream* s : all) drain(s);
}

CUresult ctx_error(CUresult err) {
  std::lock_guard<std::mutex> lock(S().mu);
  ++S().ctx_errors;
  return err;
}

// The stream a handle names: 0 is the current context's legacy default stream.
CUresult resolve(void* handle, Stream** out) {
  if (handle != nullptr) {
    auto* s = static_cast<Stream*>(handle);
    std::lock_guard<std::mutex> lock(S().mu);
    if (S().streams.count(s) == 0) return kInvalidHandle;
    *out = s;
    return kOk;
  }
  if (current == nullptr) return ctx_error(kInvalidContext);
  {
    std::lock_guard<std::mutex> lock(S().mu);
    if (current->null_stream != nullptr) {
      *out = current->null_stream;
      return kOk;
    }
  }
  Stream* s = new_stream(current);
  std::lock_guard<std::mutex> lock(S().mu);
  if (current->null_stream == nullptr) current->null_stream = s;
  *out = current->null_stream;
  return kOk;
}

// An operation that touches device memory must run in the stream's context.
CUresult resolve_in_context(void* handle, Stream** out) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  const CUresult err = resolve(handle, out);
  if (err != kOk) return err;
  if ((*out)->ctx != current) return ctx_error(kInvalidHandle);
  return kOk;
}

bool inside(const std::map<std::uintptr_t, std::size_t>& ranges, const void* p, std::size_t n) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = ranges.upper_bound(a);
  if (it == ranges.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + it->second;
}

bool device_range(const void* p, std::size_t n) {
  std::lock_guard<std::mutex> lock(S().mu);
  return inside(S().allocs, p, n);
}

double copy_seconds(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(S().mu);
  return S().latency_us * 1e-6 + static_cast<double>(bytes) / (S().bandwidth_gbs * 1e9);
}

bool initialized() {
  std::lock_guard<std::mutex> lock(S().mu);
  return S().initialized;
}

}  // namespace

// ---- the driver API --------------------------------------------------------------------------

EXPORT CUresult cuDriverGetVersion(int* v) {
  if (v == nullptr) return kInvalidValue;
  *v = env_int("FAKE_CUDA_DRIVER_VERSION", 13000);
  return kOk;
}

EXPORT CUresult cuGetErrorString(CUresult err, const char** text) {
  static const std::map<int, const char*> names = {
      {kOk, "no error"},
      {kInvalidValue, "invalid argument"},
      {kNotInitialized, "initialization error"},
      {kInvalidDevice, "invalid device ordinal"},
      {kInvalidContext, "invalid device context"},
      {kInvalidHandle, "invalid resource handle"},
      {kNotReady, "device not ready"},
      {kAlreadyRegistered, "part or all of the requested memory range is already mapped"},
      {kNotRegistered, "pointer does not correspond to a registered memory region"},
      {100, "no CUDA-capable device is detected"}};
  auto it = names.find(err);
  if (it == names.end()) return kInvalidValue;
  *text = it->second;
  return kOk;
}

EXPORT CUresult cuInit(unsigned flags) {
  if (flags != 0) return kInvalidValue;
  const int fail = env_int("FAKE_CUDA_INIT_ERROR", 0);
  if (fail != 0) return fail;
  std::lock_guard<std::mutex> lock(S().mu);
  if (!S().initialized) {
    for (int i = 0; i < 16; ++i) {
      auto* c = new Ctx();
      c->device = i;
      S().ctxs.push_back(c);
    }
    S().initialized = true;
  }
  return kOk;
}

EXPORT CUresult cuDeviceGetCount(int* n) {
  if (!initialized()) return kNotInitialized;
  *n = device_count();
  return kOk;
}

EXPORT CUresult cuDeviceGet(int* dev, int ordinal) {
  if (!initialized()) return kNotInitialized;
  if (ordinal < 0 || ordinal >= device_count()) return kInvalidDevice;
  *dev = ordinal;
  return kOk;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, int dev) {
  if (dev < 0 || dev >= device_count()) return kInvalidDevice;
  std::snprintf(name, static_cast<std::size_t>(len), "Fake CUDA device %d", dev);
  return kOk;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(Ctx** ctx, int dev) {
  if (!initialized()) return kNotInitialized;
  if (dev < 0 || dev >= device_count()) return kInvalidDevice;
  std::lock_guard<std::mutex> lock(S().mu);
  ++S().ctxs[dev]->refs;
  *ctx = S().ctxs[dev];
  return kOk;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
  if (dev < 0 || dev >= device_count()) return kInvalidDevice;
  std::lock_guard<std::mutex> lock(S().mu);
  if (S().ctxs[dev]->refs <= 0) return kInvalidContext;
  --S().ctxs[dev]->refs;
  return kOk;
}

EXPORT CUresult cuCtxGetCurrent(Ctx** ctx) {
  *ctx = current;
  return kOk;
}

EXPORT CUresult cuCtxSetCurrent(Ctx* ctx) {
  current = ctx;
  return kOk;
}

EXPORT CUresult cuCtxGetDevice(int* dev) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  *dev = current->device;
  return kOk;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, std::size_t bytes) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  if (bytes == 0) return kInvalidValue;
  void* mem = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (mem == nullptr) return 2;
  std::memset(mem, 0xA5, bytes);  // not zero: a fill that never ran shows
  std::lock_guard<std::mutex> lock(S().mu);
  S().allocs[reinterpret_cast<std::uintptr_t>(mem)] = bytes;
  S().alloc_device[reinterpret_cast<std::uintptr_t>(mem)] = current->device;
  *p = reinterpret_cast<std::uintptr_t>(mem);
  return kOk;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  drain_all();  // as cuMemFree, which synchronizes: no queued work reads freed memory
  std::lock_guard<std::mutex> lock(S().mu);
  if (S().allocs.erase(static_cast<std::uintptr_t>(p)) == 0) return kInvalidValue;
  S().alloc_device.erase(static_cast<std::uintptr_t>(p));
  std::free(reinterpret_cast<void*>(static_cast<std::uintptr_t>(p)));
  return kOk;
}

EXPORT CUresult cuMemHostRegister_v2(void* p, std::size_t bytes, unsigned) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  std::lock_guard<std::mutex> lock(S().mu);
  if (inside(S().registered, p, 1)) return kAlreadyRegistered;
  S().registered[reinterpret_cast<std::uintptr_t>(p)] = bytes;
  return kOk;
}

EXPORT CUresult cuMemHostUnregister(void* p) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  std::lock_guard<std::mutex> lock(S().mu);
  return S().registered.erase(reinterpret_cast<std::uintptr_t>(p)) == 1 ? kOk : kNotRegistered;
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, std::size_t bytes,
                                     void* stream) {
  Stream* s = nullptr;
  const CUresult err = resolve_in_context(stream, &s);
  if (err != kOk) return err;
  auto* d = reinterpret_cast<void*>(static_cast<std::uintptr_t>(dst));
  if (!device_range(d, bytes) || device_range(src, 1)) return kInvalidValue;
  push(s, [d, src, bytes] {
    sleep_s(copy_seconds(bytes));
    std::memcpy(d, src, bytes);  // the bytes land when the copy ends
    std::lock_guard<std::mutex> lock(S().mu);
    ++S().copies;
  });
  return kOk;
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, std::size_t n, void* stream) {
  Stream* s = nullptr;
  const CUresult err = resolve_in_context(stream, &s);
  if (err != kOk) return err;
  auto* d = reinterpret_cast<void*>(static_cast<std::uintptr_t>(dst));
  if (!device_range(d, n)) return kInvalidValue;
  push(s, [d, value, n] {
    sleep_s(copy_seconds(n));  // a late fill would zero a copy that landed before it
    std::memset(d, value, n);
    std::lock_guard<std::mutex> lock(S().mu);
    ++S().memsets;
  });
  return kOk;
}

EXPORT CUresult cuStreamCreate(Stream** out, unsigned) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  *out = new_stream(current);
  return kOk;
}

EXPORT CUresult cuStreamDestroy_v2(Stream* s) {
  {
    std::lock_guard<std::mutex> lock(S().mu);
    if (s == nullptr || S().streams.erase(s) == 0) return kInvalidHandle;
    S().destroyed.push_back(s);
  }
  // As CUDA: returns at once; the work already queued still runs, then the thread ends.
  std::lock_guard<std::mutex> lock(s->mu);
  s->stop = true;
  s->th.detach();
  s->cv.notify_all();
  return kOk;
}

EXPORT CUresult cuStreamSynchronize(void* stream) {
  Stream* s = nullptr;
  const CUresult err = resolve(stream, &s);
  if (err != kOk) return err;
  drain(s);
  return kOk;
}

EXPORT CUresult cuEventCreate(Event** out, unsigned flags) {
  if (current == nullptr) return ctx_error(kInvalidContext);
  auto* e = new Event();
  e->ctx = current;
  e->flags = flags;
  *out = e;
  return kOk;
}

EXPORT CUresult cuEventDestroy_v2(Event* e) {
  if (e == nullptr) return kInvalidHandle;
  std::unique_lock<std::mutex> lk(e->mu);  // as CUDA: released once its pending record is done
  e->cv.wait(lk, [&] { return e->completed >= e->recorded; });
  lk.unlock();
  delete e;
  return kOk;
}

EXPORT CUresult cuEventRecord(Event* e, void* stream) {
  Stream* s = nullptr;
  const CUresult err = resolve(stream, &s);
  if (err != kOk) return err;
  if (s->ctx != e->ctx) return ctx_error(kInvalidHandle);  // event and stream: one context
  std::uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lock(e->mu);
    seq = ++e->recorded;
  }
  push(s, [e, seq] {
    std::lock_guard<std::mutex> lock(e->mu);
    e->completed = std::max(e->completed, seq);
    e->at = Clock::now();
    e->cv.notify_all();
  });
  return kOk;
}

EXPORT CUresult cuStreamWaitEvent(void* stream, Event* e, unsigned) {
  Stream* s = nullptr;
  const CUresult err = resolve(stream, &s);
  if (err != kOk) return err;
  std::uint64_t target = 0;
  {
    std::lock_guard<std::mutex> lock(e->mu);
    target = e->recorded;  // the latest record at the time of the call; none: nothing to wait for
  }
  if (target == 0) return kOk;
  push(s, [e, target] {
    std::unique_lock<std::mutex> lk(e->mu);
    e->cv.wait(lk, [&] { return e->completed >= target; });
  });
  return kOk;
}

EXPORT CUresult cuEventQuery(Event* e) {
  std::lock_guard<std::mutex> lock(e->mu);
  return e->completed >= e->recorded ? kOk : kNotReady;
}

EXPORT CUresult cuEventSynchronize(Event* e) {
  std::unique_lock<std::mutex> lk(e->mu);
  const std::uint64_t target = e->recorded;
  e->cv.wait(lk, [&] { return e->completed >= target; });
  return kOk;
}

EXPORT CUresult cuEventElapsedTime(float* ms, Event* start, Event* end) {
  if ((start->flags & kDisableTiming) || (end->flags & kDisableTiming)) return kInvalidHandle;
  Clock::time_point a, b;
  {
    std::lock_guard<std::mutex> lock(start->mu);
    if (start->recorded == 0) return kInvalidHandle;
    if (start->completed < start->recorded) return kNotReady;
    a = start->at;
  }
  {
    std::lock_guard<std::mutex> lock(end->mu);
    if (end->recorded == 0) return kInvalidHandle;
    if (end->completed < end->recorded) return kNotReady;
    b = end->at;
  }
  *ms = static_cast<float>(std::chrono::duration<double, std::milli>(b - a).count());
  return kOk;
}

// ---- test hooks --------------------------------------------------------------------------------

EXPORT void fakecu_set_timing(double bandwidth_gbs, double latency_us, double jitter_us,
                              std::uint64_t seed) {
  std::lock_guard<std::mutex> lock(S().mu);
  S().bandwidth_gbs = bandwidth_gbs;
  S().latency_us = latency_us;
  S().jitter_us = jitter_us;
  S().seed = seed;
}

EXPORT double fakecu_copy_seconds(std::size_t bytes) { return copy_seconds(bytes); }

EXPORT std::uint64_t fakecu_checksum(const void* p, std::size_t bytes) {
  return checksum(p, bytes);
}

// A stream / an event of `device`'s primary context, made without changing the current context.
EXPORT CUresult fakecu_stream(int device, Stream** out) {
  if (cuInit(0) != kOk || device < 0 || device >= device_count()) return kInvalidDevice;
  *out = new_stream(S().ctxs[device]);
  return kOk;
}

EXPORT CUresult fakecu_event(int device, unsigned flags, Event** out) {
  if (cuInit(0) != kOk || device < 0 || device >= device_count()) return kInvalidDevice;
  Ctx* saved = current;
  current = S().ctxs[device];
  const CUresult err = cuEventCreate(out, flags);
  current = saved;
  return err;
}

// The primary context of `device` (for tests that set it current, as torch does).
EXPORT void* fakecu_primary_context(int device) {
  if (cuInit(0) != kOk || device < 0 || device >= device_count()) return nullptr;
  return S().ctxs[device];
}

// A modelled kernel on `stream` reading `bytes` of device memory at `p` for `seconds`,
// checksummed when it starts and when it ends; the ticket is for fakecu_read_result.
EXPORT CUresult fakecu_enqueue_read(void* stream, const void* p, std::size_t bytes, double seconds,
                                    std::int64_t* ticket) {
  Stream* s = nullptr;
  const CUresult err = resolve(stream, &s);
  if (err != kOk) return err;
  if (!device_range(p, bytes)) return kInvalidValue;
  {
    std::lock_guard<std::mutex> lock(S().mu);
    *ticket = static_cast<std::int64_t>(S().reads.size());
    S().reads.emplace_back();
  }
  const std::int64_t t = *ticket;
  push(s, [p, bytes, seconds, t] {
    const auto start = Clock::now();
    const std::uint64_t first = checksum(p, bytes);
    sleep_s(seconds);
    const std::uint64_t last = checksum(p, bytes);
    const auto end = Clock::now();
    std::lock_guard<std::mutex> lock(S().mu);
    Read& r = S().reads[static_cast<std::size_t>(t)];
    r = Read{true, since_t0(start), since_t0(end), first, last};
  });
  return kOk;
}

EXPORT CUresult fakecu_read_result(std::int64_t ticket, int* done, double* times,
                                   std::uint64_t* checksums) {
  std::lock_guard<std::mutex> lock(S().mu);
  if (ticket < 0 || ticket >= static_cast<std::int64_t>(S().reads.size())) return kInvalidValue;
  const Read& r = S().reads[static_cast<std::size_t>(ticket)];
  *done = r.done ? 1 : 0;
  times[0] = r.start_s;
  times[1] = r.end_s;
  checksums[0] = r.checksum_start;
  checksums[1] = r.checksum_end;
  return kOk;
}

EXPORT CUresult fakecu_enqueue_sleep(void* stream, double seconds) {
  Stream* s = nullptr;
  const CUresult err = resolve(stream, &s);
  if (err != kOk) return err;
  push(s, [seconds] { sleep_s(seconds); });
  return kOk;
}

// A modelled copy between host buffers (e.g. device-to-host of predicted ids) taking copy time.
EXPORT CUresult fakecu_enqueue_copy(void* stream, void* dst, const void* src, std::size_t bytes) {
  Stream* s = nullptr;
  const CUresult err = resolve(stream, &s);
  if (err != kOk) return err;
  push(s, [dst, src, bytes] {
    sleep_s(copy_seconds(bytes));
    std::memcpy(dst, src, bytes);
  });
  return kOk;
}

// The device whose context allocated the allocation starting at `p`; -1 when none did.
EXPORT int fakecu_pointer_device(const void* p) {
  std::lock_guard<std::mutex> lock(S().mu);
  auto it = S().alloc_device.find(reinterpret_cast<std::uintptr_t>(p));
  return it == S().alloc_device.end() ? -1 : it->second;
}

EXPORT void fakecu_synchronize_all() { drain_all(); }

// Drains the legacy default stream of `device`'s primary context (if it was ever used).
EXPORT CUresult fakecu_synchronize_default(int device) {
  if (cuInit(0) != kOk || device < 0 || device >= device_count()) return kInvalidDevice;
  Stream* s = nullptr;
  {
    std::lock_guard<std::mutex> lock(S().mu);
    s = S().ctxs[device]->null_stream;
  }
  if (s != nullptr) drain(s);
  return kOk;
}

// copies, memsets, live allocations, registered host ranges, live streams, context errors.
EXPORT void fakecu_stats(std::int64_t* out) {
  std::lock_guard<std::mutex> lock(S().mu);
  out[0] = S().copies;
  out[1] = S().memsets;
  out[2] = static_cast<std::int64_t>(S().allocs.size());
  out[3] = static_cast<std::int64_t>(S().registered.size());
  out[4] = static_cast<std::int64_t>(S().streams.size());
  out[5] = S().ctx_errors;
}
