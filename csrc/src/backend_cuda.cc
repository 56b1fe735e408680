// The CUDA backend on the driver API loaded at run time (cuda_driver.h): slots from cuMemAlloc,
// copy lanes as non-blocking streams, CUevent events, cuMemHostRegister for the pool. Every call
// is checked; a failure becomes a RuntimeFailure naming the call and cuGetErrorString. Created
// only on request (no global constructors, no libcudart): the module loads on machines without
// a driver, and one build works with any driver from cu::kMinDriverVersion on.
//
// One backend serves one device, whose index the caller names (torch's device of its tensors),
// through the device's primary context (the one torch's runtime uses). Calls made on a caller's
// thread make that context current only for their duration (CtxGuard), leaving the caller's
// current context as it was; bind_thread() sets it for good, and only the engine's own threads
// call it. A stream handle is a CUstream, the same handle as torch's cudaStream_t; 0 is the legacy
// default stream of the current context.
#ifdef MOERT_WITH_CUDA
#include <cstdint>

#include "moert/backend.h"
#include "moert/common.h"
#include "moert/cuda_driver.h"

namespace moert {

namespace {

using namespace cu;  // NOLINT: the driver's own names read best unqualified here

void check(const Driver& d, CUresult err, const char* call) {
  if (err != CUDA_SUCCESS) {
    throw RuntimeFailure(cat("CUDA error in ", cuda_error_text(d, err, call)));
  }
}

CUstream as_stream(StreamHandle s) { return reinterpret_cast<CUstream>(s); }
CUdeviceptr as_dptr(const void* p) {
  return static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(p));
}

// Makes `ctx` current on this thread for the guard's lifetime, then restores the thread's
// previous context (none included); sets nothing when it is current already.
class CtxGuard {
 public:
  CtxGuard(const Driver& d, CUcontext ctx) : d_(d), ctx_(ctx) {
    check(d_, d_.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
    if (previous_ != ctx_) check(d_, d_.cuCtxSetCurrent(ctx_), "cuCtxSetCurrent");
  }
  ~CtxGuard() {
    if (previous_ != ctx_) d_.cuCtxSetCurrent(previous_);
  }
  CtxGuard(const CtxGuard&) = delete;
  CtxGuard& operator=(const CtxGuard&) = delete;

 private:
  const Driver& d_;
  CUcontext ctx_;
  CUcontext previous_ = nullptr;
};

class CudaEvent final : public Event {
 public:
  // Blocking sync: a thread waiting in synchronize() sleeps instead of spinning a core.
  CudaEvent(const Driver& d, CUcontext ctx, bool timing) : d_(d), ctx_(ctx), timing_(timing) {
    CtxGuard guard(d_, ctx_);
    const unsigned flags = CU_EVENT_BLOCKING_SYNC | (timing ? 0u : CU_EVENT_DISABLE_TIMING);
    check(d_, d_.cuEventCreate(&ev_, flags), "cuEventCreate");
  }
  ~CudaEvent() override {
    if (ev_ != nullptr) d_.cuEventDestroy(ev_);  // errors ignored: may run at interpreter exit
  }
  // Handle 0 is the legacy default stream of the current context: made this event's context.
  void record(StreamHandle s) override {
    CtxGuard guard(d_, ctx_);
    check(d_, d_.cuEventRecord(ev_, as_stream(s)), "cuEventRecord");
  }
  void wait(StreamHandle s) override {
    CtxGuard guard(d_, ctx_);
    check(d_, d_.cuStreamWaitEvent(as_stream(s), ev_, 0), "cuStreamWaitEvent");
  }
  void synchronize() override { check(d_, d_.cuEventSynchronize(ev_), "cuEventSynchronize"); }
  bool query() override {
    const CUresult err = d_.cuEventQuery(ev_);
    if (err == CUDA_ERROR_NOT_READY) return false;
    check(d_, err, "cuEventQuery");
    return true;
  }
  double seconds_since(Event& start) override {
    auto* from = dynamic_cast<CudaEvent*>(&start);
    if (!timing_ || from == nullptr || !from->timing_) {
      throw RuntimeFailure("seconds_since needs two timing events of the CUDA backend");
    }
    float ms = 0.0f;
    check(d_, d_.cuEventElapsedTime(&ms, from->ev_, ev_), "cuEventElapsedTime");
    return static_cast<double>(ms) * 1e-3;
  }

 private:
  const Driver& d_;
  CUcontext ctx_;
  CUevent ev_ = nullptr;
  bool timing_ = false;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Driver& d, int index) : d_(d), index_(index) {
    check(d_, d_.cuDeviceGet(&device_, index_), "cuDeviceGet");
    check(d_, d_.cuDevicePrimaryCtxRetain(&ctx_, device_), "cuDevicePrimaryCtxRetain");
  }
  ~CudaBackend() override { d_.cuDevicePrimaryCtxRelease(device_); }
  const char* name() const override { return "cuda"; }
  int device_index() const override { return index_; }

  void* alloc(std::size_t bytes) override {
    CtxGuard guard(d_, ctx_);
    CUdeviceptr p = 0;
    check(d_, d_.cuMemAlloc(&p, bytes), "cuMemAlloc");
    // The copy lanes are non-blocking streams, which do not order after the legacy default
    // stream: the zero fill runs on a stream of its own and is complete before any lane may copy
    // into the slots; torch's work on the default stream is not waited for.
    CUstream fill = nullptr;
    CUresult err = d_.cuStreamCreate(&fill, CU_STREAM_NON_BLOCKING);
    if (err == CUDA_SUCCESS) err = d_.cuMemsetD8Async(p, 0, bytes, fill);
    if (err == CUDA_SUCCESS) err = d_.cuStreamSynchronize(fill);
    if (fill != nullptr) d_.cuStreamDestroy(fill);
    if (err != CUDA_SUCCESS) {
      d_.cuMemFree(p);
      check(d_, err, "zero fill of the slots (cuMemsetD8Async)");
    }
    return reinterpret_cast<void*>(static_cast<std::uintptr_t>(p));
  }
  void free(void* p, std::size_t) noexcept override {
    if (p == nullptr) return;
    try {
      CtxGuard guard(d_, ctx_);
      d_.cuMemFree(as_dptr(p));
    } catch (...) {
    }
  }
  void pin_host(void* p, std::size_t bytes) override {
    CtxGuard guard(d_, ctx_);
    // Portable: page-locked for every context, whichever device a cache copies to.
    check(d_, d_.cuMemHostRegister(p, bytes, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister");
  }
  void unpin_host(void* p) noexcept override {
    try {
      CtxGuard guard(d_, ctx_);
      d_.cuMemHostUnregister(p);
    } catch (...) {
    }
  }

  StreamHandle create_stream() override {
    CtxGuard guard(d_, ctx_);
    CUstream s = nullptr;
    check(d_, d_.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    return reinterpret_cast<StreamHandle>(s);
  }
  void destroy_stream(StreamHandle s) noexcept override {
    if (s == 0) return;
    try {
      CtxGuard guard(d_, ctx_);
      d_.cuStreamDestroy(as_stream(s));
    } catch (...) {
    }
  }
  void bind_thread() override { check(d_, d_.cuCtxSetCurrent(ctx_), "cuCtxSetCurrent"); }
  void copy_async(void* dst, const void* src, std::size_t bytes, StreamHandle s) override {
    CtxGuard guard(d_, ctx_);  // sets nothing on a bound worker thread
    check(d_, d_.cuMemcpyHtoDAsync(as_dptr(dst), src, bytes, as_stream(s)), "cuMemcpyHtoDAsync");
  }
  void synchronize_stream(StreamHandle s) override {
    CtxGuard guard(d_, ctx_);
    check(d_, d_.cuStreamSynchronize(as_stream(s)), "cuStreamSynchronize");
  }
  std::unique_ptr<Event> create_event() override {
    return std::make_unique<CudaEvent>(d_, ctx_, false);
  }
  std::unique_ptr<Event> create_timing_event() override {
    return std::make_unique<CudaEvent>(d_, ctx_, true);
  }

 private:
  const Driver& d_;
  int index_ = 0;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
};

const Driver& driver_or_throw() {
  std::string error;
  const Driver* d = load_cuda_driver(&error);
  if (d == nullptr) throw RuntimeFailure(error);
  return *d;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int index) {
  return std::make_unique<CudaBackend>(driver_or_throw(), index);
}

int cuda_current_device() {
  const Driver& d = driver_or_throw();
  CUcontext ctx = nullptr;
  check(d, d.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (ctx == nullptr) return 0;  // no context on this thread: device 0, as the runtime's default
  CUdevice device = 0;
  check(d, d.cuCtxGetDevice(&device), "cuCtxGetDevice");
  return device;
}

}  // namespace moert
#endif  // MOERT_WITH_CUDA
