// CopyEngine: moves experts from the ExpertPool into SlabCache slots.
//
// K lanes, each served by one worker thread (CUDA and the device model: a stream per lane; CPU
// twin: the worker memcpy's). One priority queue holds the copies to do: demand loads before
// prefetches, FIFO within a class. A copy into a slot first waits on that slot's last-use event,
// so no slot is overwritten while a kernel that read the previous expert may still run.
// Pipelined lanes (CUDA, sim): a worker issues a copy (last-use wait, copy, ready event) and goes
// on to the next without waiting for it; the lane's completion thread waits on the ready events in
// issue order (blocking sync: no spinning core) and marks the slots ready. A lane takes the next
// request only while no other lane has fewer copies in flight (n misses spread over the lanes);
// demand copies are issued at once, prefetches only while the lane has fewer than
// kPrefetchDepth in flight, so a later demand load waits behind at most that many prefetches.
//
// A tiered pool (expert_pool.h): the thread that issues a copy first takes the expert's host slab
// (ExpertPool::acquire_host, which may read it from its file on that thread) and releases it once
// the copy is complete (CPU twin: after the memcpy; pipelined lanes: in the completion thread).
//
// acquire(layer, experts, stream): under the cache lock, pins every expert (all or nothing: if
// the misses cannot all get a slot now, it pins nothing and waits for a release or a finished
// copy, so concurrent acquires never deadlock holding partial pins). Hits that are ready need
// nothing; misses get a slot (evicting by policy, or cancelling a queued prefetch) and a demand
// copy; a hit on a still-queued prefetch is promoted to demand. Then it waits: on the CPU twin
// the caller copies its own demand loads (no thread hand-off) and blocks until every slot is
// ready; CUDA and the device model block the host only until each copy is issued (its
// ready event recorded) and make `stream` wait on the ready events (cudaStreamWaitEvent); when a
// slot's copy is not complete yet, timing events around those waits measure how long the stream
// really waited (EngineStats::device_stall_s). A stream that is the host itself
// (Backend::is_host_stream: the device model's handle 0) blocks until the slots are ready.
// Duplicate experts in one call are collapsed: each distinct expert is pinned once, and release
// must be called with the same list (duplicates collapse the same way).
// release(layer, experts, stream): records each slot's last-use event on `stream`, unpins.
//
// Failures. A copy that fails (at issue, or found by the completion thread) loads nothing: the
// entry leaves the table and its slot is freed once unpinned (SlabCache::fail_locked). An acquire
// or wait_ready waiting for it raises with the entry, slot and cause, unpinning what it pinned;
// when a device copy fails after an acquire returned (the caller's stream waited on it: what it
// computed from the slot is wrong), the next call raises that once (release after unpinning); a
// failed prefetch only counts. The engine stays usable: the next access copies the entry again. A
// lane thread that stops on an exception fails the copy it held and makes every later call (but
// release and close) raise.
//
// Predictions (DESIGN §3 step 2). A prediction is, for `n` layers, a row of `width` expert ids
// (most likely first, -1 = padding) and optionally a row of E scores per layer. Applying one, under
// the cache lock: the priorities of every expert of the `clear` layers are set to `clear_score`
// (the layer that just ran: a caller passing ever lower scores makes the most recently run layer,
// whose next use is farthest away in a decode cycle, go first), each predicted layer's E priorities
// are replaced by its score row, then each id row is prefetched in order (own layer first).
// predict() applies at once; predict_async() records an event on `stream` (after the device-to-host
// copy that fills the caller's host buffers) and returns a ticket: the engine's prediction thread
// waits on that event, then reads the buffers and applies, so the caller never blocks. The buffers
// must stay valid and unchanged until predictions_done() >= ticket (wait_predictions blocks for
// that). Requests are applied in submission order.
//
// Read-ahead (a tiered pool, expert_pool.h; off until set_read_ahead(k) with k >= 1). Every
// expert that prefetch() or a prediction queues for a device copy gets a pool read_ahead at once,
// so its file read runs on the pool's reader threads while it waits for a lane (a lane's
// acquire_host then waits on that read instead of reading again). A prediction's first k + 1 rows
// (its own layer and the k after it) also read ahead every listed expert not ready on the device,
// whether or not the device cache could take a copy. Only the pool's queue is touched (under the
// cache lock, then the pool's: never the other way round).
//
// Thread safety: every method may be called from many threads at once; blocking waits happen
// without the Python GIL (see bindings.cc).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <queue>
#include <string>
#include <thread>
#include <utility>
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
  std::int64_t predictions = 0;     // predictions applied (predict + predict_async)
  double prediction_wait_s = 0.0;   // prediction thread: waiting on the device for predicted ids
  std::int64_t queued = 0;          // copies waiting for a lane now
  double busy_s = 0.0;              // summed over lanes: time the lane had a copy in flight
  double demand_stall_s = 0.0;      // time acquire()/wait_ready() waited for copies (summed)
  // CUDA and sim (modelled time): device time the callers' streams waited in acquire() for
  // copies not yet complete (timing events around the stream waits; counted once the stream has
  // passed them). 0 on the CPU twin and on host streams, where the host blocks for every copy and
  // demand_stall_s is the whole stall.
  double device_stall_s = 0.0;
  std::int64_t device_stall_waits = 0;  // acquires whose stream had to wait (CUDA, sim)
  std::int64_t failed_copies = 0;       // copies that failed (their entries were not loaded)
  int lanes = 0;
};

// Per layer (the layer passed to acquire / wait_ready): acquire calls and the host time they and
// wait_ready waited for copies. The rows sum to EngineStats' acquires and demand_stall_s.
struct EngineLayerStats {
  std::int64_t acquires = 0;
  double demand_stall_s = 0.0;
};

// Everything the engine and its cache count, read under one lock (a consistent snapshot).
struct StatsSnapshot {
  EngineStats engine;
  std::vector<EngineLayerStats> engine_layers;  // (num_layers,)
  CacheStats cache;
  std::vector<CacheStats> cache_layers;  // (num_layers,)
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
  // See "Read-ahead" above: k >= 0 (0: off).
  void set_read_ahead(int k);
  int read_ahead() const { return read_ahead_.load(); }
  // See "Predictions" above. layers: (n,); ids: (n, width); scores: (n, E) or null; clear:
  // (n_clear,). predict returns how many copies were queued.
  int predict(const std::int32_t* layers, std::int64_t n, const std::int32_t* ids,
              std::int64_t width, const float* scores, const std::int32_t* clear,
              std::int64_t n_clear, float clear_score = 0.0f);
  std::uint64_t predict_async(const std::int32_t* layers, std::int64_t n, const std::int32_t* ids,
                              std::int64_t width, const float* scores, const std::int32_t* clear,
                              std::int64_t n_clear, float clear_score, StreamHandle stream);
  std::uint64_t predictions_done();
  void wait_predictions(std::uint64_t ticket);
  // One slot per input position (duplicates map to the same slot). With wait=false (deferred
  // waits) acquire returns once every expert is pinned and its copy queued: nothing waits for the
  // copies, the CPU twin's demand loads go to the workers too, and `pending` (when given) gets, per
  // input position, 1 where the copy was not complete at return. The caller calls wait_ready for
  // those before reading them, one at a time if it likes, so compute on the first experts overlaps
  // the copies of the later ones.
  std::vector<std::int32_t> acquire(int layer, const std::int32_t* experts, std::int64_t n,
                                    StreamHandle stream, bool wait = true,
                                    std::vector<std::uint8_t>* pending = nullptr);
  // For experts acquired (pinned) by a deferred acquire: the CPU twin (and a host stream) blocks
  // until their copies are complete; CUDA and sim streams block the host until they are issued and
  // make `stream` wait on their ready events (timed, as in acquire). Host waits count in
  // demand_stall_s.
  void wait_ready(int layer, const std::int32_t* experts, std::int64_t n, StreamHandle stream);
  void release(int layer, const std::int32_t* experts, std::int64_t n, StreamHandle stream);
  // Blocks until no copy is queued or in flight.
  void synchronize();
  // Counters so far. Device stalls are counted once the caller's stream has passed them;
  // wait_device first waits until the newest timed wait is passed (blocks on the device).
  EngineStats stats(bool wait_device = false);
  // stats() plus the per-layer rows and the cache's counters, all under the cache lock.
  StatsSnapshot snapshot(bool wait_device = false);
  // Zeroes the engine's counters (totals and per layer); the cache's are reset by its own
  // reset_stats. Device stalls of waits not yet harvested count after the reset.
  void reset_stats();
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

  struct Prediction {
    std::vector<std::int32_t> layers;
    const std::int32_t* ids;
    std::int64_t width;
    const float* scores;
    std::vector<std::int32_t> clear;
    float clear_score;
    std::unique_ptr<Event> event;
    std::uint64_t ticket;
  };

  void worker(int lane);
  // CPU twin: copies `slot` (state loading) on the calling thread; `lk` holds the cache mutex on
  // entry and exit and is released during the copy.
  void copy_locked(std::unique_lock<std::mutex>& lk, int slot);

  // Pipelined lanes (copy_lanes.cc). Copies a lane may have in flight before it stops taking
  // prefetches.
  static constexpr int kPrefetchDepth = 2;
  struct Flight {
    int slot;
    int key;  // the expert copied (its host slab is released when the copy completes)
    bool demand;
    std::chrono::steady_clock::time_point issued;
  };
  // Whether `lane` should take the head of the queue now (see the header comment).
  bool can_take_locked(int lane) const;
  // Issues the copy of `slot` (state loading) on `lane` without waiting for it: state issued,
  // handed to the lane's completion thread. `lk` is released while the copy is enqueued.
  void issue_locked(std::unique_lock<std::mutex>& lk, int slot, int lane);
  // The lane's completion thread: waits for its copies in issue order, marks them ready.
  void completer(int lane);
  void complete_flights(std::unique_lock<std::mutex>& lk, int lane, std::deque<Flight>& flights);
  void prediction_worker();
  void check_prediction_args(const std::int32_t* layers, std::int64_t n, const std::int32_t* ids,
                             std::int64_t width, const std::int32_t* clear,
                             std::int64_t n_clear) const;
  // Reads the host rows (validating every id and score) and applies them; returns copies queued.
  int apply_prediction_locked(const std::vector<std::int32_t>& layers, const std::int32_t* ids,
                              std::int64_t width, const float* scores,
                              const std::vector<std::int32_t>& clear, float clear_score);
  // Throws when closed, after a lane died, or (once) to report a failure found after acquire
  // returned.
  void check_usable_locked(const char* what);
  // Adds the device stall of every timed acquire whose stream has passed its end mark, oldest
  // first; with `block`, first waits until the newest mark is passed (with one caller stream,
  // stats() then counts every acquire so far).
  void harvest_stalls_locked(bool block);
  std::unique_ptr<Event> take_timing_event_locked();
  // Blocks (cache lock released while waiting) until every slot reaches `need`; throws, unpinning
  // nothing, when the engine closes or a copy fails meanwhile. Returns whether it waited.
  bool wait_slots_locked(std::unique_lock<std::mutex>& lk, const std::vector<std::int32_t>& slots,
                         SlotState need, const char* what);
  // A copy into `slot` failed (`why`): the entry is not loaded (SlabCache::fail_locked); callers
  // waiting for it, and holders that release it, get the failure with its context.
  void fail_slot_locked(int slot, const std::string& why);
  // A lane's thread stops on an exception (`why`), holding `slot` (-1: none): the engine cannot
  // copy any more; every later call but release and close says so.
  void lane_died_locked(const char* thread, int lane, int slot, const std::string& why);
  // The pinned slot of (layer, expert) for wait_ready / release: its table slot, or a failed one.
  int pinned_slot_locked(int layer, int expert) const;
  // Makes `stream` wait on the slots' ready events (CUDA), timing the wait when a copy may still
  // run (device_stall_s).
  void stream_wait_locked(const std::vector<std::int32_t>& slots, StreamHandle stream);
  void push_locked(int cls, int slot);
  // Read-ahead of `experts` of `layer` (distinct ids), skipping those ready on the device; with
  // only_queued, just those whose device copy is queued (state loading).
  void read_ahead_locked(int layer, const std::vector<std::int32_t>& experts, bool only_queued);
  void add_stall_locked(int layer, double seconds);
  bool pending_locked() const;

  std::shared_ptr<SlabCache> cache_;
  SlabCache& c_;  // *cache_
  Backend& backend_;
  double slot_timeout_s_;
  std::vector<StreamHandle> lanes_;
  std::vector<std::unique_ptr<Event>> ready_;
  std::vector<std::unique_ptr<Event>> last_use_;
  std::vector<std::thread> workers_;
  bool async_copies_ = false;  // pipelined lanes (CUDA, sim), not the CPU twin's memcpy
  std::vector<std::thread> completers_;
  std::vector<std::deque<Flight>> flights_;  // per lane, in issue order
  std::vector<int> lane_load_;               // per lane: copies taken and not yet complete
  std::vector<std::chrono::steady_clock::time_point> lane_done_;  // per lane: last completion
  std::condition_variable flight_cv_;  // with c_.mu_: a copy issued, or the lanes stopped
  bool lanes_stopped_ = false;         // no worker will issue again: completers drain and exit
  std::priority_queue<Request, std::vector<Request>, Later> queue_;
  std::condition_variable work_cv_;  // with c_.mu_
  bool stop_ = false;
  std::atomic<bool> closed_{false};
  std::atomic<int> read_ahead_{0};
  std::string error_;
  std::vector<std::string> slot_error_;  // per slot: why its last failed copy failed
  // Per slot: an acquire returned while its copy ran (the caller's stream waits on it); a failure
  // of that copy goes to report_, which the next call raises once.
  std::vector<std::uint8_t> handed_;
  std::string report_;
  std::uint64_t seq_ = 0;
  int in_flight_ = 0;
  EngineStats stats_;
  std::vector<EngineLayerStats> layer_stats_;  // (num_layers,)

  // Prediction thread (started by the first predict_async), its queue and spare events.
  std::thread predictor_;
  std::deque<Prediction> predictions_;
  std::vector<std::unique_ptr<Event>> spare_events_;
  std::condition_variable pred_cv_;  // with c_.mu_: a request queued, one applied, or stop
  std::uint64_t submitted_ = 0;
  std::uint64_t applied_ = 0;

  // Device-stall marks (CUDA): (before the waits, after them) on the caller's stream, oldest first.
  bool device_timing_ = false;
  std::deque<std::pair<std::unique_ptr<Event>, std::unique_ptr<Event>>> stall_marks_;
  std::vector<std::unique_ptr<Event>> spare_timing_;
};

}  // namespace moert
