// CopyEngine: moves experts from the ExpertPool into SlabCache slots.
//
// K lanes, each served by one worker thread (CUDA: a non-blocking stream per lane; CPU twin: the
// worker memcpy's). One priority queue holds the copies to do: demand loads before prefetches,
// FIFO within a class. A copy into a slot first waits on that slot's last-use event, so no slot
// is overwritten while a kernel that read the previous expert may still run.
//
// acquire(layer, experts, stream): under the cache lock, pins every expert (all or nothing: if
// the misses cannot all get a slot now, it pins nothing and waits for a release or a finished
// copy, so concurrent acquires never deadlock holding partial pins). Hits that are ready need
// nothing; misses get a slot (evicting by policy, or cancelling a queued prefetch) and a demand
// copy; a hit on a still-queued prefetch is promoted to demand. Then it waits: the CPU twin
// blocks until every slot is ready; CUDA blocks the host only until each copy is issued (its
// ready event recorded) and makes `stream` wait on the ready events (cudaStreamWaitEvent).
// Duplicate experts in one call are collapsed: each distinct expert is pinned once, and release
// must be called with the same list (duplicates collapse the same way).
// release(layer, experts, stream): records each slot's last-use event on `stream`, unpins.
//
// Thread safety: every method may be called from many threads at once; blocking waits happen
// without the Python GIL (see bindings.cc).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <thread>
#include <vector>

#include "moert/backend.h"
#include "moert/slab_cache.h"

namespace moert {

struct EngineStats {
  std::int64_t bytes = 0;
  std::int64_t copies = 0;
  std::int64_t demand_copies = 0;
  std::int64_t prefetch_copies = 0;
  std::int64_t acquires = 0;
  std::int64_t releases = 0;
  std::int64_t stale_requests = 0;  // queue entries whose slot was cancelled or promoted
  std::int64_t queued = 0;          // copies waiting for a lane now
  double busy_s = 0.0;              // summed over lanes: issue to completion of every copy
  double demand_stall_s = 0.0;      // time acquire() waited for copies (summed over callers)
  int lanes = 0;
};

class CopyEngine {
 public:
  // slot_timeout_s: how long acquire() waits for slots while every slot stays pinned before it
  // raises (a caller that acquires more than it releases would otherwise wait forever).
  CopyEngine(std::shared_ptr<SlabCache> cache, int num_streams, double slot_timeout_s = 60.0);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  int num_streams() const { return static_cast<int>(lanes_.size()); }
  const std::shared_ptr<SlabCache>& cache() const { return cache_; }
  bool closed() const { return closed_.load(); }

  int prefetch(int layer, const std::int32_t* experts, std::int64_t n);
  // One slot per input position (duplicates map to the same slot).
  std::vector<std::int32_t> acquire(int layer, const std::int32_t* experts, std::int64_t n,
                                    StreamHandle stream);
  void release(int layer, const std::int32_t* experts, std::int64_t n, StreamHandle stream);
  // Blocks until no copy is queued or in flight.
  void synchronize();
  EngineStats stats();
  // Cancels queued copies, waits for the ones in flight, joins the workers. Idempotent.
  void close();

 private:
  struct Request {
    int cls;  // 0 demand, 1 prefetch
    std::uint64_t seq;
    std::int32_t slot;
    std::uint32_t gen;
  };
  struct Later {
    bool operator()(const Request& a, const Request& b) const {
      return a.cls != b.cls ? a.cls > b.cls : a.seq > b.seq;
    }
  };

  void worker(int lane);
  void check_usable_locked(const char* what) const;
  void push_locked(int cls, int slot);
  bool pending_locked() const;

  std::shared_ptr<SlabCache> cache_;
  SlabCache& c_;  // *cache_
  Backend& backend_;
  double slot_timeout_s_;
  std::vector<StreamHandle> lanes_;
  std::vector<std::unique_ptr<Event>> ready_;
  std::vector<std::unique_ptr<Event>> last_use_;
  std::vector<std::thread> workers_;
  std::priority_queue<Request, std::vector<Request>, Later> queue_;
  std::condition_variable work_cv_;  // with c_.mu_
  bool stop_ = false;
  std::atomic<bool> closed_{false};
  std::string error_;
  std::uint64_t seq_ = 0;
  int in_flight_ = 0;
  EngineStats stats_;
};

}  // namespace moert
