// SlabCache: S fixed-size slots on a device, a table (layer, expert) -> slot and the eviction
// policy. The cache is pure bookkeeping plus slot memory; CopyEngine moves the bytes.
//
// Slot life: empty -> loading (a copy is queued, not yet issued) -> issuing (a worker took it)
// -> issued (the copy is in flight; its ready event is recorded) -> ready -> (evicted) -> ...
// A copy that fails leaves the slot empty and `failed`: the entry leaves the table at once (the
// next access loads it again) and the slot is free once every holder has unpinned it.
// A slot with pins > 0 is in use and never evicted. Victims are chosen among unpinned ready
// slots by the policy, lowest key first:
//   lru       (last access tick)
//   lfu       (accesses since the entry was loaded, then last access tick)
//   priority  (score set per (layer, expert) from Python, then last access tick)
// Empty slots are used first (lowest id). A demand load that finds no empty or evictable slot
// cancels the most recently queued prefetch that no one has asked for yet. A prefetch never
// cancels anything and never waits: with no empty or evictable slot it gives up (counted).
// Prefetched entries do not count as accessed: their first access is a prefetch hit (and a hit),
// and one evicted or cancelled before any access is wasted.
//
// The simulated cache (SlabCache::simulated) runs the same code with no memory: loads complete
// at once, so `sim_access` / `sim_prefetch` / `replay` give what the engine would decide.
//
// Thread safety: every public method takes the cache mutex; CopyEngine shares that mutex.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moert/backend.h"
#include "moert/expert_pool.h"

namespace moert {

class CopyEngine;

enum class SlotState : std::uint8_t { kEmpty, kLoading, kIssuing, kIssued, kReady };

enum class Policy { kLru, kLfu, kPriority };

// Every count since construction or reset_stats(), in total and per layer. Invariants (once the
// engine is idle), for the totals and for each layer's row alike:
//   bytes_loaded == loads * slab_bytes;  loads == demand_loads + prefetch_loads;
//   misses == demand_loads;  prefetches == prefetch_loads + prefetch_cancelled;
// and every counter's rows sum to its total. A count goes to the layer of the entry it is about:
// hits, misses, loads and their bytes, prefetches and their hits, lateness, waste and
// cancellation to the entry's own layer (a prefetch for layer l counts in l's row, whichever layer
// was running when it was queued or copied); an eviction to the evicted entry's layer (the layer
// that lost the slot, not the one that took it); a dropped prefetch request to the layer it was
// for.
struct CacheStats {
  std::int64_t hits = 0;
  std::int64_t misses = 0;
  std::int64_t evictions = 0;
  std::int64_t prefetches = 0;             // prefetch loads queued (sim: done)
  std::int64_t prefetch_hits = 0;          // first accesses of prefetched entries
  std::int64_t prefetch_late = 0;          // ... of which the copy had not finished yet
  std::int64_t prefetch_wasted = 0;        // prefetched entries evicted/cancelled before any access
  std::int64_t prefetch_wasted_bytes = 0;  // bytes actually copied for those
  std::int64_t prefetch_cancelled = 0;     // queued prefetches cancelled by a demand load
  std::int64_t prefetch_dropped = 0;       // prefetch requests that found no slot
  std::int64_t loads = 0;                  // copies issued (sim: loads done)
  std::int64_t demand_loads = 0;
  std::int64_t prefetch_loads = 0;
  std::int64_t bytes_loaded = 0;

  using Field = std::int64_t CacheStats::*;
  // Every counter with its name, for code that treats them alike (differences, bindings).
  static const std::array<std::pair<const char*, Field>, 14>& fields();
  CacheStats operator-(const CacheStats& o) const;
};

struct ReplayArgs {
  std::int64_t steps = 0;
  const std::int32_t* layers = nullptr;   // (N,)
  const std::int32_t* experts = nullptr;  // (N, k), -1 = padding
  std::int64_t k = 0;
  const std::int32_t* prefetch = nullptr;  // (N, m) or null, -1 = padding
  std::int64_t m = 0;
  const std::int32_t* prefetch_layers = nullptr;  // (N,) or null (= layers)
  const float* priorities = nullptr;              // (N, k) or null
  // After step i's access (and its priorities): all E priorities of its layer, then a prefetch
  // into its layer (a policy's plan after the call, e.g. utility).
  const float* after_scores = nullptr;           // (N, E) or null
  const std::int32_t* after_prefetch = nullptr;  // (N, a) or null, -1 = padding
  std::int64_t a = 0;
  // A step with more distinct experts than slots streams them in waves of at most the slots,
  // resident first, each part ascending by id (the runtime's order); false: it is an error.
  bool waves = false;
  std::int32_t* hits_per_step = nullptr;  // (N,) output
                                          // Optional outputs for the simulator's cost model
                                          // (moert/sim/timeline.py), or null: the copies
  // step i's prefetch row queued (their sequence numbers follow prefetch_seq() in order), and the
  // sequence numbers of the prefetched entries step i's access uses first (-1 after them); the
  // copies step i's prefetch after the call (after_prefetch) queued, numbered after step i's
  // others.
  std::int32_t* prefetch_queued = nullptr;        // (N,) output
  std::int32_t* prefetch_after_queued = nullptr;  // (N,) output
  std::int64_t* prefetch_used = nullptr;          // (N, k) output
};

class SlabCache {
 public:
  static Policy parse_policy(const std::string& name);
  static const char* policy_name(Policy p);

  // A cache of num_slots slots on `device` ("cpu", "sim", "cuda" or "cuda:N"; see make_backend)
  // holding entries of `pool`.
  SlabCache(std::shared_ptr<ExpertPool> pool, int num_slots, const std::string& policy,
            const std::string& device, int min_slots);
  // The same on a backend made by the caller (the device model with its own timing).
  SlabCache(std::shared_ptr<ExpertPool> pool, int num_slots, const std::string& policy,
            std::unique_ptr<Backend> backend, int min_slots);
  // The simulated cache: no pool, no memory, loads instant.
  SlabCache(int num_layers, int num_experts, int num_slots, const std::string& policy,
            std::int64_t slab_bytes, int min_slots);
  ~SlabCache();
  SlabCache(const SlabCache&) = delete;
  SlabCache& operator=(const SlabCache&) = delete;

  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  int num_slots() const { return num_slots_; }
  std::size_t slab_bytes() const { return slab_bytes_; }
  std::size_t stride() const { return stride_; }
  Policy policy() const { return policy_; }
  const std::string& device() const { return device_; }  // "cpu", "sim" or "cuda:N"
  Backend* backend() const { return backend_.get(); }    // null for the simulated cache
  bool simulated() const { return simulated_; }
  bool closed() const { return closed_.load(); }

  int lookup(int layer, int expert);
  // Per expert of `layer`: 1 when its slot is ready; with `in_flight`, also when a copy into its
  // slot is queued or running (it will be ready without another load).
  std::vector<std::uint8_t> resident(int layer, bool in_flight = false);
  void set_priority(int layer, const std::int32_t* experts, const float* scores, std::int64_t n);
  std::uintptr_t slot_address(int slot);
  CacheStats stats();
  // One row per layer (see CacheStats); with `total`, also stats(), read under the same lock
  // (the rows then sum to it exactly).
  std::vector<CacheStats> layer_stats(CacheStats* total = nullptr);
  void reset_stats();

  int sim_prefetch(int layer, const std::int32_t* experts, std::int64_t n);
  int sim_access(int layer, const std::int32_t* experts, std::int64_t n);
  CacheStats replay(const ReplayArgs& args);
  // Prefetches placed so far: the next prefetch copy's sequence number (see ReplayArgs).
  std::int64_t prefetch_seq();

  // Closes the attached copy engine (joins its workers), then marks the cache closed. Slot
  // memory is returned when the last owner is gone.
  void close();

 private:
  friend class CopyEngine;

  struct EvictKey {
    double primary;
    std::uint64_t tick;
    std::int32_t slot;
    bool operator<(const EvictKey& o) const {
      if (primary != o.primary) return primary < o.primary;
      if (tick != o.tick) return tick < o.tick;
      return slot < o.slot;
    }
  };

  struct Slot {
    std::int32_t key = -1;
    SlotState state = SlotState::kEmpty;
    std::int32_t pins = 0;
    bool prefetched = false;  // loaded by a prefetch
    bool accessed = false;    // accessed since it was loaded
    bool demanded = false;    // a demand request exists: no longer cancellable
    bool in_evict = false;
    bool in_cancel = false;
    bool last_use_recorded = false;
    // Its copy failed: out of the table (key kept for messages), free once its pins reach 0.
    bool failed = false;
    std::uint32_t gen = 0;
    std::uint64_t tick = 0;
    std::uint64_t freq = 0;
    std::uint64_t queue_seq = 0;
    std::int64_t prefetch_seq = -1;  // which prefetch placed it (prefetch_seq_ then), or -1
    EvictKey ekey{0.0, 0, 0};
  };

  // The constructors' halves: validate the pool and sizes; take the backend and its slot memory.
  void check_pool_args(int num_slots, const std::string& policy, int min_slots);
  void attach_backend(std::unique_ptr<Backend> backend);
  void check_open(const char* what) const;
  void check_layer(int layer) const;
  void check_expert(int expert) const;
  void check_sim(const char* what) const;
  int key_of(int layer, int expert) const { return layer * num_experts_ + expert; }

  // All *_locked methods need mu_ held.
  // Adds n to `field` of the totals and of `layer`'s row.
  void count_locked(int layer, CacheStats::Field field, std::int64_t n = 1) {
    stats_.*field += n;
    layer_stats_[layer].*field += n;
  }
  int layer_of(int key) const { return key / num_experts_; }
  void refresh_locked(int slot);  // re-files the slot in the evict / cancel sets
  void touch_locked(int slot, bool count);
  int take_slot_locked(bool demand);
  void evict_locked(int slot);
  void place_locked(int slot, int key, bool prefetch);
  void on_issue_locked(int slot);
  void on_ready_locked(int slot);
  // Distinct experts of `experts` (first occurrence order); ArgumentError on a bad id.
  void distinct_locked(const std::int32_t* experts, std::int64_t n, bool skip_padding,
                       std::vector<std::int32_t>* out);
  // How many loads could start now for a demand access needing `misses` slots.
  bool can_place_locked(int layer, const std::vector<std::int32_t>& distinct);
  // Pins every expert (hits first, then loads for misses); returns the hit count and fills
  // slots (one per distinct expert) and the slots whose load this call started.
  int pin_access_locked(int layer, const std::vector<std::int32_t>& distinct,
                        std::vector<std::int32_t>* slots, std::vector<std::int32_t>* loads);
  void unpin_locked(int slot);
  // The slot's copy failed: the entry is not loaded (see Slot::failed).
  void fail_locked(int slot);
  // One replay step's access of `distinct` (sorted in place when it streams in waves); the hits.
  int replay_access_locked(int layer, std::vector<std::int32_t>* distinct,
                           std::vector<std::int32_t>* slots, std::vector<std::int32_t>* loads);
  int prefetch_locked(int layer, const std::vector<std::int32_t>& distinct,
                      std::vector<std::int32_t>* queued);
  void set_priority_locked(int layer, int expert, float score);

  std::shared_ptr<ExpertPool> pool_;
  int num_layers_;
  int num_experts_;
  int num_slots_;
  std::size_t slab_bytes_;
  std::size_t stride_;
  Policy policy_;
  std::string device_;
  bool simulated_;
  std::unique_ptr<Backend> backend_;
  std::uint8_t* slots_mem_ = nullptr;
  std::size_t slots_bytes_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;  // slot state or pin changes
  std::atomic<bool> closed_{false};
  CopyEngine* engine_ = nullptr;

  std::vector<Slot> slots_;
  std::vector<std::int32_t> table_;  // key -> slot or -1
  std::vector<float> priority_;      // key -> score
  std::set<std::int32_t> free_;
  std::set<EvictKey> evictable_;
  std::set<std::pair<std::uint64_t, std::int32_t>> cancellable_;  // (queue seq, slot)
  std::vector<std::uint32_t> mark_;                               // expert -> epoch, for dedupe
  std::uint32_t epoch_ = 0;
  std::uint64_t tick_ = 0;
  std::uint64_t queue_seq_ = 0;
  std::int64_t prefetch_seq_ = 0;  // prefetches placed so far (never reset)
  CacheStats stats_;
  std::vector<CacheStats> layer_stats_;  // (num_layers,)
};

}  // namespace moert
