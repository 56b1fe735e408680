// The CPU twin of the device backend, the backend factory and page-aligned host allocation.
#include "moert/backend.h"

#include <sys/mman.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "moert/backend_sim.h"
#include "moert/common.h"
#include "moert/cuda_probe.h"

namespace moert {

void* alloc_host_pages(std::size_t bytes) {
  MOERT_CHECK(bytes > 0, "cannot allocate 0 bytes");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw RuntimeFailure(cat("mmap of ", bytes, " bytes failed: ", std::strerror(errno)));
  }
  return p;
}

void free_host_pages(void* p, std::size_t bytes) noexcept {
  if (p != nullptr) munmap(p, bytes);
}

void Backend::copy_async_faulty(void* dst, const void* src, std::size_t bytes, StreamHandle s,
                                const CopyFault& fault) {
  if (fault.fail) throw RuntimeFailure(cat("injected fault: copy #", fault.index, " failed"));
  copy_async(dst, src, bytes, s);
}

namespace {

// On the CPU twin all work on a lane is done synchronously by the thread that enqueues it, so
// an event is complete as soon as it is recorded. The counter still orders record/wait pairs
// made from different threads: wait() returns only once the latest record() has completed.
class CpuEvent final : public Event {
 public:
  void record(StreamHandle) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++recorded_;
    completed_ = recorded_;
    cv_.notify_all();
  }
  void wait(StreamHandle) override { synchronize(); }
  void synchronize() override {
    std::unique_lock<std::mutex> lock(mu_);
    const std::uint64_t target = recorded_;
    cv_.wait(lock, [&] { return completed_ >= target; });
  }
  bool query() override {
    std::lock_guard<std::mutex> lock(mu_);
    return completed_ >= recorded_;
  }
  double seconds_since(Event&) override {
    throw RuntimeFailure("the CPU twin's events do not time device work");
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::uint64_t recorded_ = 0;
  std::uint64_t completed_ = 0;
};

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  int device_index() const override { return -1; }
  void* alloc(std::size_t bytes) override { return alloc_host_pages(bytes); }
  void free(void* p, std::size_t bytes) noexcept override { free_host_pages(p, bytes); }
  void pin_host(void*, std::size_t) override {}
  void unpin_host(void*) noexcept override {}
  StreamHandle create_stream() override { return 0; }
  void destroy_stream(StreamHandle) noexcept override {}
  void bind_thread() override {}
  void copy_async(void* dst, const void* src, std::size_t bytes, StreamHandle) override {
    std::memcpy(dst, src, bytes);
  }
  // A slow copy sleeps (slow - 1) times as long as its memcpy took after doing it.
  void copy_async_faulty(void* dst, const void* src, std::size_t bytes, StreamHandle s,
                         const CopyFault& fault) override {
    if (fault.fail) throw RuntimeFailure(cat("injected fault: copy #", fault.index, " failed"));
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(dst, src, bytes);
    if (fault.slow > 1.0) {
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - t0;
      const double extra = (fault.slow - 1.0) * took.count();
      std::this_thread::sleep_for(std::chrono::duration<double>(extra));
      faults::add_slow_seconds(extra);
    }
    (void)s;
  }
  void synchronize_stream(StreamHandle) override {}
  std::unique_ptr<Event> create_event() override { return std::make_unique<CpuEvent>(); }
};

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return std::make_unique<CpuBackend>();
  if (device == "sim") return std::make_unique<SimBackend>(SimConfig{});
  const bool cuda = device == "cuda" || device.rfind("cuda:", 0) == 0;
  MOERT_CHECK(cuda, "unknown device '", device, "'; use 'cpu', 'sim', 'cuda' or 'cuda:N'");
  int index = -1;
  if (device != "cuda") {
    const std::string digits = device.substr(5);
    MOERT_CHECK(!digits.empty() && digits.size() <= 4 &&
                    digits.find_first_not_of("0123456789") == std::string::npos,
                "device '", device, "': the index after 'cuda:' must be a number, e.g. 'cuda:1'");
    index = std::stoi(digits);
  }
  CudaProbe probe = cuda_probe();
  if (probe.device_count <= 0) throw RuntimeFailure(probe.message);
#ifdef MOERT_WITH_CUDA
  if (index < 0) index = cuda_current_device();
  MOERT_CHECK(index < probe.device_count, "device '", device, "': there are only ",
              probe.device_count, " CUDA devices (cuda:0..cuda:", probe.device_count - 1, ")");
  return make_cuda_backend(index);
#else
  (void)index;
  throw RuntimeFailure("no CUDA device: moert was built without the CUDA backend");
#endif
}

}  // namespace moert
