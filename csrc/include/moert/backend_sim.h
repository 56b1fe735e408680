// The asynchronous device model ("sim"): the CUDA protocol of the Backend interface, executed on
// the host, so that CI exercises what only a GPU would otherwise show (issued vs ready slots,
// stream waits, last-use events, device-stall timing).
//
//   streams  Each stream is a FIFO of operations executed in order by its own thread. Handle 0 is
//            the host itself (torch computing on the calling thread is the compute stream): a
//            record on it completes at once, a wait on it blocks the caller until the event is
//            complete, a copy on it is done by the caller.
//   events   record(s) enqueues a mark: the event completes when stream s reaches it, at that
//            stream's device time. wait(s) enqueues an operation that holds s until the event's
//            latest record as of the call has completed (a never-recorded event: no wait).
//            query / synchronize / seconds_since as cudaEvent*.
//   time     A device clock: seconds since the backend was made. An operation starts at the
//            latest of its stream's previous end, the host's enqueue time and (waits) the event's
//            completion, plus a random delay in [0, jitter_us] drawn from the stream's own seeded
//            generator; it ends after its modelled duration. The stream's thread sleeps until
//            then (no spinning) and applies the effect. Timestamps (events, reads) are modelled
//            device time, exact whatever the host's scheduling noise; wall time follows them.
//   copies   latency_us + bytes / bandwidth_gbs each; every stream copies at that bandwidth (one
//            DMA engine per stream). The bytes land in 1 MiB pieces as the transfer progresses,
//            the last one at the copy's end: a reader that did not wait sees old or torn bytes.
//   kernels  enqueue_read(s, address, bytes, seconds): a modelled kernel that holds s for
//            `seconds` and checksums the bytes when it starts and when it ends (read_result).
//            enqueue_sleep(s, seconds): a kernel that only takes time.
//
// Memory is host memory (slot views are host tensors); free() first drains every stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "moert/backend.h"

namespace moert {

struct SimConfig {
  double bandwidth_gbs = 25.0;  // per stream, 1e9 bytes per second
  double latency_us = 10.0;     // per copy
  double jitter_us = 0.0;       // each operation starts up to this much later (uniform)
  std::uint64_t seed = 0;       // of the jitter

  // ArgumentError naming the field unless bandwidth > 0 and latency, jitter >= 0 (all finite).
  void check() const;
};

// What a modelled kernel read saw (enqueue_read).
struct SimRead {
  bool done = false;
  double start_s = 0.0;  // device time
  double end_s = 0.0;
  std::uint64_t checksum_start = 0;
  std::uint64_t checksum_end = 0;
};

class SimBackend final : public Backend {
 public:
  explicit SimBackend(const SimConfig& config);
  ~SimBackend() override;
  SimBackend(const SimBackend&) = delete;
  SimBackend& operator=(const SimBackend&) = delete;

  const char* name() const override { return "sim"; }
  int device_index() const override { return 0; }
  bool is_host_stream(StreamHandle s) const override { return s == 0; }
  void* alloc(std::size_t bytes) override;
  void free(void* p, std::size_t bytes) noexcept override;
  void pin_host(void*, std::size_t) override {}
  void unpin_host(void*) noexcept override {}
  StreamHandle create_stream() override;
  void destroy_stream(StreamHandle s) noexcept override;
  void bind_thread() override {}
  void copy_async(void* dst, const void* src, std::size_t bytes, StreamHandle s) override;
  // A slow copy takes `slow` times its modelled time; a failing one lands no bytes and the next
  // event recorded on its stream completes with the failure: its synchronize() throws.
  void copy_async_faulty(void* dst, const void* src, std::size_t bytes, StreamHandle s,
                         const CopyFault& fault) override;
  void synchronize_stream(StreamHandle s) override;
  std::unique_ptr<Event> create_event() override;
  std::unique_ptr<Event> create_timing_event() override;

  // The model's own entry points (tests, benchmarks). A stream handle that this backend did not
  // create (or already destroyed) is an ArgumentError.
  const SimConfig& config() const;
  double now() const;                            // the device clock, seconds
  double copy_seconds(std::size_t bytes) const;  // latency + transfer, without jitter
  std::int64_t enqueue_read(StreamHandle s, const void* p, std::size_t bytes, double seconds);
  SimRead read_result(std::int64_t ticket);
  void enqueue_sleep(StreamHandle s, double seconds);
  void synchronize();  // every stream drained
  static std::uint64_t checksum(const void* p, std::size_t bytes);

  struct Core;

 private:
  std::shared_ptr<Core> core_;
};

}  // namespace moert
