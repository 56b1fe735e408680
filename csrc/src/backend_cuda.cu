// The CUDA backend: slots from cudaMalloc, copy lanes as non-blocking streams, cudaEvent_t
// events, cudaHostRegister for the pool. Every CUDA call is checked; a failure becomes a
// RuntimeFailure naming the call and cudaGetErrorString. Created only on request (no global
// constructors): the module loads on machines without a driver.
//
// One backend serves one device, whose index the caller names (torch's device of its tensors).
// Calls made on a caller's thread switch to that device only for their duration (DeviceGuard);
// bind_thread() sets it for good, and only the engine's own threads call it.
#include <cuda_runtime.h>

#include "moert/backend.h"
#include "moert/common.h"

namespace moert {

namespace {

void check_cuda(cudaError_t err, const char* call) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw RuntimeFailure(cat("CUDA error in ", call, ": ", cudaGetErrorString(err), " (",
                             static_cast<int>(err), ")"));
  }
}

cudaStream_t as_stream(StreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }

// Makes `device` current on this thread for the guard's lifetime and then restores the thread's
// device; sets nothing when it is current already (no context is touched needlessly).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

class CudaEvent final : public Event {
 public:
  // Blocking sync: a thread waiting in synchronize() sleeps instead of spinning a core.
  CudaEvent(int device, bool timing) : device_(device), timing_(timing) {
    DeviceGuard guard(device_);
    const unsigned flags = cudaEventBlockingSync | (timing ? 0u : cudaEventDisableTiming);
    check_cuda(cudaEventCreateWithFlags(&ev_, flags), "cudaEventCreate");
  }
  ~CudaEvent() override {
    if (ev_ != nullptr) cudaEventDestroy(ev_);  // errors ignored: may run at interpreter exit
  }
  // Handle 0 is the legacy default stream of the current device: made this event's device.
  void record(StreamHandle s) override {
    DeviceGuard guard(device_);
    check_cuda(cudaEventRecord(ev_, as_stream(s)), "cudaEventRecord");
  }
  void wait(StreamHandle s) override {
    DeviceGuard guard(device_);
    check_cuda(cudaStreamWaitEvent(as_stream(s), ev_, 0), "cudaStreamWaitEvent");
  }
  void synchronize() override { check_cuda(cudaEventSynchronize(ev_), "cudaEventSynchronize"); }
  bool query() override {
    const cudaError_t err = cudaEventQuery(ev_);
    if (err == cudaErrorNotReady) return false;
    check_cuda(err, "cudaEventQuery");
    return true;
  }
  double seconds_since(Event& start) override {
    auto* from = dynamic_cast<CudaEvent*>(&start);
    if (!timing_ || from == nullptr || !from->timing_) {
      throw RuntimeFailure("seconds_since needs two timing events of the CUDA backend");
    }
    float ms = 0.0f;
    check_cuda(cudaEventElapsedTime(&ms, from->ev_, ev_), "cudaEventElapsedTime");
    return static_cast<double>(ms) * 1e-3;
  }

 private:
  cudaEvent_t ev_ = nullptr;
  int device_ = 0;
  bool timing_ = false;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  const char* name() const override { return "cuda"; }
  int device_index() const override { return device_; }

  void* alloc(std::size_t bytes) override {
    DeviceGuard guard(device_);
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
    // The copy lanes are non-blocking streams, which do not order after the legacy default
    // stream (where cudaMemset runs): the zero fill runs on a stream of its own and is complete
    // before any lane may copy into the slots; torch's work on the default stream is not waited
    // for.
    cudaStream_t fill = nullptr;
    cudaError_t err = cudaStreamCreateWithFlags(&fill, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaMemsetAsync(p, 0, bytes, fill);
    if (err == cudaSuccess) err = cudaStreamSynchronize(fill);
    if (fill != nullptr) cudaStreamDestroy(fill);
    if (err != cudaSuccess) {
      cudaFree(p);
      check_cuda(err, "zero fill of the slots (cudaMemsetAsync)");
    }
    return p;
  }
  void free(void* p, std::size_t) noexcept override {
    if (p == nullptr) return;
    try {
      DeviceGuard guard(device_);
      cudaFree(p);
    } catch (...) {
    }
  }
  void pin_host(void* p, std::size_t bytes) override {
    DeviceGuard guard(device_);
    // Portable: page-locked for every device, whichever one a cache copies to.
    check_cuda(cudaHostRegister(p, bytes, cudaHostRegisterPortable), "cudaHostRegister");
  }
  void unpin_host(void* p) noexcept override { cudaHostUnregister(p); }

  StreamHandle create_stream() override {
    DeviceGuard guard(device_);
    cudaStream_t s = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    return reinterpret_cast<StreamHandle>(s);
  }
  void destroy_stream(StreamHandle s) noexcept override {
    if (s != 0) cudaStreamDestroy(as_stream(s));
  }
  void bind_thread() override { check_cuda(cudaSetDevice(device_), "cudaSetDevice"); }
  void copy_async(void* dst, const void* src, std::size_t bytes, StreamHandle s) override {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, as_stream(s)),
               "cudaMemcpyAsync");
  }
  void synchronize_stream(StreamHandle s) override {
    DeviceGuard guard(device_);
    check_cuda(cudaStreamSynchronize(as_stream(s)), "cudaStreamSynchronize");
  }
  std::unique_ptr<Event> create_event() override {
    return std::make_unique<CudaEvent>(device_, false);
  }
  std::unique_ptr<Event> create_timing_event() override {
    return std::make_unique<CudaEvent>(device_, true);
  }

 private:
  int device_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int index) {
  return std::make_unique<CudaBackend>(index);
}

int cuda_current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

}  // namespace moert
