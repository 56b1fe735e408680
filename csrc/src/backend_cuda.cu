// The CUDA backend: slots from cudaMalloc, copy lanes as non-blocking streams, cudaEvent_t
// events, cudaHostRegister for the pool. Every CUDA call is checked; a failure becomes a
// RuntimeFailure naming the call and cudaGetErrorString. Created only on request (no global
// constructors): the module loads on machines without a driver.
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

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(bool timing) : timing_(timing) {
    check_cuda(cudaEventCreateWithFlags(&ev_, timing ? cudaEventDefault : cudaEventDisableTiming),
               "cudaEventCreate");
  }
  ~CudaEvent() override {
    if (ev_ != nullptr) cudaEventDestroy(ev_);  // errors ignored: may run at interpreter exit
  }
  void record(StreamHandle s) override {
    check_cuda(cudaEventRecord(ev_, as_stream(s)), "cudaEventRecord");
  }
  void wait(StreamHandle s) override {
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
  bool timing_ = false;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend() { check_cuda(cudaGetDevice(&device_), "cudaGetDevice"); }
  const char* name() const override { return "cuda"; }
  int device_index() const override { return device_; }

  void* alloc(std::size_t bytes) override {
    bind_thread();
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
    cudaError_t err = cudaMemset(p, 0, bytes);
    if (err != cudaSuccess) {
      cudaFree(p);
      check_cuda(err, "cudaMemset");
    }
    return p;
  }
  void free(void* p, std::size_t) noexcept override {
    if (p != nullptr) cudaFree(p);
  }
  void pin_host(void* p, std::size_t bytes) override {
    check_cuda(cudaHostRegister(p, bytes, cudaHostRegisterDefault), "cudaHostRegister");
  }
  void unpin_host(void* p) noexcept override { cudaHostUnregister(p); }

  StreamHandle create_stream() override {
    bind_thread();
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
    check_cuda(cudaStreamSynchronize(as_stream(s)), "cudaStreamSynchronize");
  }
  std::unique_ptr<Event> create_event() override {
    bind_thread();
    return std::make_unique<CudaEvent>(false);
  }
  std::unique_ptr<Event> create_timing_event() override {
    bind_thread();
    return std::make_unique<CudaEvent>(true);
  }

 private:
  int device_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace moert
