// The device backend: the few things the cache and the copy engine need from a device, behind
// one interface with two implementations of the same semantics.
//
//   cpu  (the CPU twin, backend.cc): slot memory is page-aligned host memory; a "stream" is a
//        copy lane served by one engine worker thread, so copy_async is a memcpy done by that
//        thread (asynchronous to the thread that asked for it); events are a sequence counter
//        plus a condition variable.
//   cuda (backend_cuda.cc): the CUDA driver API loaded at run time (cuda_driver.h). Slot memory
//        from cuMemAlloc, lanes are non-blocking CUstreams, events are CUevents (blocking sync;
//        timing disabled, except timing events), host memory pinned with cuMemHostRegister. One
//        device, named by the caller ("cuda:N"), through its primary context; every call made on a
//        caller's thread leaves that thread's current context as it found it.
//   sim  (backend_sim.cc): the asynchronous device model, the CUDA protocol executed on the
//        host with modelled time (see backend_sim.h); what CI runs the CUDA path on.
//
// Nothing here runs at library load: a backend exists only once a cache or pool asks for one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "moert/faults.h"

namespace moert {

// A stream handle as Python passes it (torch.cuda.current_stream().cuda_stream); 0 is the
// legacy default stream on CUDA and "the calling thread" on the CPU twin.
using StreamHandle = std::uintptr_t;

// Marks a point in a stream's work. Ordering guarantee (both backends): work enqueued on stream
// B after `wait(B)` starts only after the work enqueued on stream A before `record(A)` is done.
class Event {
 public:
  virtual ~Event() = default;
  virtual void record(StreamHandle stream) = 0;
  virtual void wait(StreamHandle stream) = 0;
  virtual void synchronize() = 0;  // the host blocks until the recorded work is done
  // True once the recorded work is done (never blocks).
  virtual bool query() = 0;
  // Device seconds from `start`'s completion to this event's, both recorded and complete; only
  // for events from Backend::create_timing_event (anything else throws RuntimeFailure).
  virtual double seconds_since(Event& start) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int device_index() const = 0;  // -1 for the CPU twin
  // True when `s` stands for the calling thread itself, which computes synchronously (the CPU
  // twin; the sim's handle 0): the host waits for copies, and events recorded on it complete at
  // once. False on CUDA, where 0 is the legacy default stream.
  virtual bool is_host_stream(StreamHandle s) const {
    (void)s;
    return device_index() < 0;
  }

  // Slot arena: one allocation of `bytes`, aligned to at least 256 bytes, zero-filled.
  virtual void* alloc(std::size_t bytes) = 0;
  virtual void free(void* p, std::size_t bytes) noexcept = 0;

  // Page-lock host memory for fast asynchronous copies (cuMemHostRegister); no-op on the CPU twin.
  virtual void pin_host(void* p, std::size_t bytes) = 0;
  virtual void unpin_host(void* p) noexcept = 0;

  // Copy lanes. bind_thread() is called once by every worker thread before it uses a lane.
  virtual StreamHandle create_stream() = 0;
  virtual void destroy_stream(StreamHandle s) noexcept = 0;
  virtual void bind_thread() = 0;
  virtual void copy_async(void* dst, const void* src, std::size_t bytes, StreamHandle s) = 0;
  // copy_async under the test fault plan (moert/faults.h). Here: a failing copy throws at issue,
  // `slow` is ignored; the CPU twin and the device model override it.
  virtual void copy_async_faulty(void* dst, const void* src, std::size_t bytes, StreamHandle s,
                                 const CopyFault& fault);
  virtual void synchronize_stream(StreamHandle s) = 0;

  virtual std::unique_ptr<Event> create_event() = 0;
  // An event that can time device work (CUDA), or nullptr where the device has no clock of its
  // own (the CPU twin: the host does every copy, so host time is device time).
  virtual std::unique_ptr<Event> create_timing_event() { return nullptr; }
};

// "cpu" and "sim" (the device model with its default timing) always work. "cuda:N" (or "cuda":
// the calling thread's current device) throws RuntimeFailure("no CUDA device: ...") unless the
// CUDA backend was compiled and device N can run; any other name is an ArgumentError.
std::unique_ptr<Backend> make_backend(const std::string& device);

// The CUDA backend (backend_cuda.cc) of device `index`, only declared when it is compiled in.
#ifdef MOERT_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int index);
int cuda_current_device();
#endif

// Page-aligned, zero-filled host memory (mmap); throws RuntimeFailure when the OS refuses.
void* alloc_host_pages(std::size_t bytes);
void free_host_pages(void* p, std::size_t bytes) noexcept;

}  // namespace moert
