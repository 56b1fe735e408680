#include "moert/slab_cache.h"

#include <algorithm>
#include <cmath>
#include <iterator>

#include "moert/common.h"
#include "moert/copy_engine.h"
#include "moert/faults.h"

namespace moert {

const std::array<std::pair<const char*, CacheStats::Field>, 14>& CacheStats::fields() {
  static const std::array<std::pair<const char*, Field>, 14> kFields{{
      {"hits", &CacheStats::hits},
      {"misses", &CacheStats::misses},
      {"evictions", &CacheStats::evictions},
      {"prefetches", &CacheStats::prefetches},
      {"prefetch_hits", &CacheStats::prefetch_hits},
      {"prefetch_late", &CacheStats::prefetch_late},
      {"prefetch_wasted", &CacheStats::prefetch_wasted},
      {"prefetch_wasted_bytes", &CacheStats::prefetch_wasted_bytes},
      {"prefetch_cancelled", &CacheStats::prefetch_cancelled},
      {"prefetch_dropped", &CacheStats::prefetch_dropped},
      {"loads", &CacheStats::loads},
      {"demand_loads", &CacheStats::demand_loads},
      {"prefetch_loads", &CacheStats::prefetch_loads},
      {"bytes_loaded", &CacheStats::bytes_loaded},
  }};
  return kFields;
}

CacheStats CacheStats::operator-(const CacheStats& o) const {
  CacheStats d;
  for (const auto& field : fields()) d.*field.second = this->*field.second - o.*field.second;
  return d;
}

Policy SlabCache::parse_policy(const std::string& name) {
  if (name == "lru") return Policy::kLru;
  if (name == "lfu") return Policy::kLfu;
  if (name == "priority") return Policy::kPriority;
  throw ArgumentError(cat("unknown policy '", name, "'; use one of: lru, lfu, priority"));
}

const char* SlabCache::policy_name(Policy p) {
  switch (p) {
    case Policy::kLru:
      return "lru";
    case Policy::kLfu:
      return "lfu";
    case Policy::kPriority:
      return "priority";
  }
  return "?";
}

namespace {
constexpr long long kMaxEntries = 1LL << 24;

void check_sizes(int num_layers, int num_experts, int num_slots, int min_slots) {
  MOERT_CHECK(num_layers > 0, "num_layers must be positive, got ", num_layers);
  MOERT_CHECK(num_experts > 0, "num_experts must be positive, got ", num_experts);
  MOERT_CHECK(min_slots >= 1, "min_slots must be >= 1, got ", min_slots);
  MOERT_CHECK(num_slots >= min_slots, "cache has ", num_slots,
              " slots but one layer needs top-k=", min_slots, "; use at least ", min_slots);
  const long long entries = static_cast<long long>(num_layers) * num_experts;
  // The (layer, expert) table and priorities take 8 bytes per entry: refuse sizes no model has
  // (Qwen3-30B-A3B has 6,144 entries) before allocating anything.
  MOERT_CHECK(entries <= kMaxEntries, num_layers, " layers x ", num_experts, " experts = ", entries,
              " (layer, expert) entries is more than the ", kMaxEntries,
              " a cache table holds; check the sizes (layers and experts per layer)");
  MOERT_CHECK(num_slots <= entries, "cache has ", num_slots, " slots but there are only ", entries,
              " experts (", num_layers, " layers x ", num_experts, "); use at most ", entries);
}
}  // namespace

SlabCache::SlabCache(std::shared_ptr<ExpertPool> pool, int num_slots, const std::string& policy,
                     const std::string& device, int min_slots)
    : pool_(std::move(pool)), simulated_(false) {
  check_pool_args(num_slots, policy, min_slots);
  attach_backend(make_backend(device));
}

SlabCache::SlabCache(std::shared_ptr<ExpertPool> pool, int num_slots, const std::string& policy,
                     std::unique_ptr<Backend> backend, int min_slots)
    : pool_(std::move(pool)), simulated_(false) {
  check_pool_args(num_slots, policy, min_slots);
  MOERT_CHECK(backend != nullptr, "SlabCache needs a device backend, got none");
  attach_backend(std::move(backend));
}

void SlabCache::check_pool_args(int num_slots, const std::string& policy, int min_slots) {
  MOERT_CHECK(pool_ != nullptr, "SlabCache needs an ExpertPool, got None");
  pool_->check_open("(used by SlabCache)");
  num_layers_ = pool_->num_layers();
  num_experts_ = pool_->num_experts();
  num_slots_ = num_slots;
  slab_bytes_ = pool_->slab_bytes();
  stride_ = pool_->stride();
  policy_ = parse_policy(policy);
  check_sizes(num_layers_, num_experts_, num_slots, min_slots);
}

void SlabCache::attach_backend(std::unique_ptr<Backend> backend) {
  backend_ = std::move(backend);
  device_ = backend_->name();
  if (device_ == "cuda") device_ = cat("cuda:", backend_->device_index());
  slots_.resize(num_slots_);
  table_.assign(static_cast<std::size_t>(num_layers_) * num_experts_, -1);
  priority_.assign(table_.size(), 0.0f);
  mark_.assign(num_experts_, 0);
  layer_stats_.assign(num_layers_, CacheStats{});
  for (int s = 0; s < num_slots_; ++s) free_.insert(s);
  // Last: the destructor, which frees the arena, does not run when a constructor throws.
  slots_bytes_ = static_cast<std::size_t>(num_slots_) * stride_;
  try {
    if (faults::armed()) faults::next_alloc(slots_bytes_);
    slots_mem_ = static_cast<std::uint8_t*>(backend_->alloc(slots_bytes_));
  } catch (const RuntimeFailure& e) {
    throw RuntimeFailure(cat("SlabCache of ", num_slots_, " slots on ", device_, ": ", e.what()));
  }
}

SlabCache::SlabCache(int num_layers, int num_experts, int num_slots, const std::string& policy,
                     std::int64_t slab_bytes, int min_slots)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      num_slots_(num_slots),
      device_("sim"),
      simulated_(true) {
  MOERT_CHECK(slab_bytes > 0, "slab_bytes must be positive, got ", slab_bytes);
  policy_ = parse_policy(policy);
  check_sizes(num_layers, num_experts, num_slots, min_slots);
  slab_bytes_ = static_cast<std::size_t>(slab_bytes);
  stride_ = slab_bytes_;
  slots_.resize(num_slots);
  table_.assign(static_cast<std::size_t>(num_layers_) * num_experts_, -1);
  priority_.assign(table_.size(), 0.0f);
  mark_.assign(num_experts_, 0);
  layer_stats_.assign(num_layers_, CacheStats{});
  for (int s = 0; s < num_slots; ++s) free_.insert(s);
}

SlabCache::~SlabCache() {
  if (slots_mem_ != nullptr) backend_->free(slots_mem_, slots_bytes_);
}

void SlabCache::check_open(const char* what) const {
  if (closed_.load()) throw RuntimeFailure(cat("SlabCache.", what, ": the cache is closed"));
}

void SlabCache::check_layer(int layer) const {
  MOERT_CHECK(layer >= 0 && layer < num_layers_, "layer ", layer, " is out of range [0, ",
              num_layers_, ")");
}

void SlabCache::check_expert(int expert) const {
  MOERT_CHECK(expert >= 0 && expert < num_experts_, "expert ", expert, " is out of range [0, ",
              num_experts_, ")");
}

void SlabCache::check_sim(const char* what) const {
  MOERT_CHECK(simulated_, what,
              " needs a cache made by SlabCache.simulated(...); on a real cache use "
              "CopyEngine.prefetch/acquire/release");
}

// ---- bookkeeping (mu_ held) ----------------------------------------------------------------

void SlabCache::refresh_locked(int s) {
  Slot& sl = slots_[s];
  if (sl.in_evict) {
    evictable_.erase(sl.ekey);
    sl.in_evict = false;
  }
  if (sl.in_cancel) {
    cancellable_.erase({sl.queue_seq, s});
    sl.in_cancel = false;
  }
  if (sl.pins != 0 || sl.key < 0) return;
  if (sl.state == SlotState::kReady) {
    double primary = 0.0;
    if (policy_ == Policy::kLfu) primary = static_cast<double>(sl.freq);
    if (policy_ == Policy::kPriority) primary = priority_[sl.key];
    sl.ekey = EvictKey{primary, sl.tick, s};
    evictable_.insert(sl.ekey);
    sl.in_evict = true;
  } else if (sl.state == SlotState::kLoading && sl.prefetched && !sl.demanded) {
    cancellable_.insert({sl.queue_seq, s});
    sl.in_cancel = true;
  }
}

void SlabCache::touch_locked(int s, bool count) {
  slots_[s].tick = ++tick_;
  if (count) ++slots_[s].freq;
}

void SlabCache::evict_locked(int s) {
  Slot& sl = slots_[s];
  const bool cancelled = sl.state == SlotState::kLoading;
  const int layer = layer_of(sl.key);
  count_locked(layer, cancelled ? &CacheStats::prefetch_cancelled : &CacheStats::evictions);
  if (sl.prefetched && !sl.accessed) {
    count_locked(layer, &CacheStats::prefetch_wasted);
    if (!cancelled) {
      count_locked(layer, &CacheStats::prefetch_wasted_bytes,
                   static_cast<std::int64_t>(slab_bytes_));
    }
  }
  table_[sl.key] = -1;
  sl.key = -1;
  sl.state = SlotState::kEmpty;
  sl.prefetched = sl.accessed = sl.demanded = false;
  refresh_locked(s);
}

int SlabCache::take_slot_locked(bool demand) {
  if (!free_.empty()) {
    const int s = *free_.begin();
    free_.erase(free_.begin());
    return s;
  }
  if (!evictable_.empty()) {
    const int s = evictable_.begin()->slot;
    evict_locked(s);
    return s;
  }
  if (demand && !cancellable_.empty()) {
    const int s = std::prev(cancellable_.end())->second;  // the most recently queued prefetch
    evict_locked(s);
    return s;
  }
  return -1;
}

void SlabCache::place_locked(int s, int key, bool prefetch) {
  Slot& sl = slots_[s];
  sl.key = key;
  ++sl.gen;
  sl.prefetched = prefetch;
  sl.prefetch_seq = prefetch ? prefetch_seq_++ : -1;
  sl.accessed = false;
  sl.demanded = !prefetch;
  sl.freq = 0;
  table_[key] = s;
  if (prefetch) count_locked(layer_of(key), &CacheStats::prefetches);
  if (simulated_) {
    sl.state = SlotState::kReady;
    on_issue_locked(s);
  } else {
    sl.state = SlotState::kLoading;
    sl.queue_seq = ++queue_seq_;
  }
}

void SlabCache::on_issue_locked(int s) {
  const int layer = layer_of(slots_[s].key);
  count_locked(layer, &CacheStats::loads);
  count_locked(layer, &CacheStats::bytes_loaded, static_cast<std::int64_t>(slab_bytes_));
  count_locked(layer,
               slots_[s].prefetched ? &CacheStats::prefetch_loads : &CacheStats::demand_loads);
}

void SlabCache::on_ready_locked(int s) {
  slots_[s].state = SlotState::kReady;
  refresh_locked(s);
}

void SlabCache::distinct_locked(const std::int32_t* experts, std::int64_t n, bool skip_padding,
                                std::vector<std::int32_t>* out) {
  out->clear();
  MOERT_CHECK(n >= 0, "negative expert count ", n);
  MOERT_CHECK(n == 0 || experts != nullptr, "expert list is null");
  if (++epoch_ == 0) {
    std::fill(mark_.begin(), mark_.end(), 0);
    epoch_ = 1;
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const int e = experts[i];
    if (skip_padding && e == -1) continue;
    check_expert(e);
    if (mark_[e] == epoch_) continue;
    mark_[e] = epoch_;
    out->push_back(e);
  }
}

bool SlabCache::can_place_locked(int layer, const std::vector<std::int32_t>& distinct) {
  std::size_t misses = 0;
  std::size_t own = 0;  // our own hits that currently count as evictable or cancellable
  for (int e : distinct) {
    const int s = table_[key_of(layer, e)];
    if (s < 0) {
      ++misses;
    } else if (slots_[s].in_evict || slots_[s].in_cancel) {
      ++own;
    }
  }
  return misses + own <= free_.size() + evictable_.size() + cancellable_.size();
}

int SlabCache::pin_access_locked(int layer, const std::vector<std::int32_t>& distinct,
                                 std::vector<std::int32_t>* slots,
                                 std::vector<std::int32_t>* loads) {
  slots->assign(distinct.size(), -1);
  loads->clear();
  int hits = 0;
  for (std::size_t i = 0; i < distinct.size(); ++i) {
    const int s = table_[key_of(layer, distinct[i])];
    if (s < 0) continue;
    Slot& sl = slots_[s];
    ++hits;
    count_locked(layer, &CacheStats::hits);
    if (sl.prefetched && !sl.accessed) {
      count_locked(layer, &CacheStats::prefetch_hits);
      if (sl.state != SlotState::kReady) count_locked(layer, &CacheStats::prefetch_late);
    }
    sl.accessed = true;
    ++sl.pins;
    touch_locked(s, true);
    refresh_locked(s);
    (*slots)[i] = s;
  }
  for (std::size_t i = 0; i < distinct.size(); ++i) {
    if ((*slots)[i] >= 0) continue;
    const int s = take_slot_locked(true);
    if (s < 0) {
      throw RuntimeFailure(cat("internal: no slot for a demand load of layer ", layer,
                               " (can_place was not checked)"));
    }
    count_locked(layer, &CacheStats::misses);
    place_locked(s, key_of(layer, distinct[i]), false);
    Slot& sl = slots_[s];
    sl.accessed = true;
    ++sl.pins;
    touch_locked(s, true);
    refresh_locked(s);
    (*slots)[i] = s;
    loads->push_back(s);
  }
  return hits;
}

void SlabCache::unpin_locked(int s) {
  Slot& sl = slots_[s];
  --sl.pins;
  if (sl.failed && sl.pins == 0) {  // the last holder of a failed load let go: the slot is free
    sl.key = -1;
    sl.failed = false;
    sl.prefetched = sl.accessed = sl.demanded = false;
    ++sl.gen;
    free_.insert(s);
  }
  refresh_locked(s);
}

void SlabCache::fail_locked(int s) {
  Slot& sl = slots_[s];
  if (table_[sl.key] == s) table_[sl.key] = -1;  // the next access loads the entry again
  sl.state = SlotState::kEmpty;
  sl.failed = true;
  ++sl.pins;  // unpin_locked frees the slot once no holder is left
  unpin_locked(s);
}

int SlabCache::prefetch_locked(int layer, const std::vector<std::int32_t>& distinct,
                               std::vector<std::int32_t>* queued) {
  queued->clear();
  // A batch never evicts its own members: those already resident (or loading) are held for the
  // rest of this call, like the entries it queues below.
  std::vector<std::int32_t> held;
  for (int e : distinct) {
    const int s = table_[key_of(layer, e)];
    if (s < 0) continue;
    ++slots_[s].pins;
    refresh_locked(s);
    held.push_back(s);
  }
  for (int e : distinct) {
    const int key = key_of(layer, e);
    if (table_[key] >= 0) continue;
    const int s = take_slot_locked(false);
    if (s < 0) {
      count_locked(layer, &CacheStats::prefetch_dropped);
      continue;
    }
    place_locked(s, key, true);
    touch_locked(s, false);
    ++slots_[s].pins;  // held for the rest of this call: a batch never evicts its own entries
    refresh_locked(s);
    queued->push_back(s);
  }
  for (int s : *queued) unpin_locked(s);
  for (int s : held) unpin_locked(s);
  return static_cast<int>(queued->size());
}

void SlabCache::set_priority_locked(int layer, int expert, float score) {
  const int key = key_of(layer, expert);
  if (priority_[key] == score) return;  // re-filing the slot would change nothing
  priority_[key] = score;
  const int s = table_[key];
  if (s >= 0) refresh_locked(s);
}

// ---- public API ----------------------------------------------------------------------------

int SlabCache::lookup(int layer, int expert) {
  check_open("lookup");
  check_layer(layer);
  check_expert(expert);
  std::lock_guard<std::mutex> lock(mu_);
  const int s = table_[key_of(layer, expert)];
  return (s >= 0 && slots_[s].state == SlotState::kReady) ? s : -1;
}

std::vector<std::uint8_t> SlabCache::resident(int layer, bool in_flight) {
  check_open("resident");
  check_layer(layer);
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::uint8_t> out(num_experts_, 0);
  for (int e = 0; e < num_experts_; ++e) {
    const int s = table_[key_of(layer, e)];
    out[e] = (s >= 0 && (in_flight || slots_[s].state == SlotState::kReady)) ? 1 : 0;
  }
  return out;
}

void SlabCache::set_priority(int layer, const std::int32_t* experts, const float* scores,
                             std::int64_t n) {
  check_open("set_priority");
  check_layer(layer);
  MOERT_CHECK(n >= 0, "negative expert count ", n);
  for (std::int64_t i = 0; i < n; ++i) {
    check_expert(experts[i]);
    MOERT_CHECK(std::isfinite(scores[i]), "set_priority: score ", scores[i], " for expert ",
                experts[i], " is not finite");
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (std::int64_t i = 0; i < n; ++i) set_priority_locked(layer, experts[i], scores[i]);
}

std::uintptr_t SlabCache::slot_address(int slot) {
  check_open("slot_address");
  MOERT_CHECK(!simulated_, "slot_address: a simulated cache has no slot memory");
  MOERT_CHECK(slot >= 0 && slot < num_slots_, "slot ", slot, " is out of range [0, ", num_slots_,
              ")");
  return reinterpret_cast<std::uintptr_t>(slots_mem_ + static_cast<std::size_t>(slot) * stride_);
}

CacheStats SlabCache::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::vector<CacheStats> SlabCache::layer_stats(CacheStats* total) {
  std::lock_guard<std::mutex> lock(mu_);
  if (total != nullptr) *total = stats_;
  return layer_stats_;
}

void SlabCache::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = CacheStats{};
  layer_stats_.assign(num_layers_, CacheStats{});
}

int SlabCache::sim_prefetch(int layer, const std::int32_t* experts, std::int64_t n) {
  check_open("sim_prefetch");
  check_sim("sim_prefetch");
  check_layer(layer);
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::int32_t> distinct, queued;
  distinct_locked(experts, n, false, &distinct);
  return prefetch_locked(layer, distinct, &queued);
}

int SlabCache::sim_access(int layer, const std::int32_t* experts, std::int64_t n) {
  check_open("sim_access");
  check_sim("sim_access");
  check_layer(layer);
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::int32_t> distinct, slots, loads;
  distinct_locked(experts, n, false, &distinct);
  MOERT_CHECK(distinct.size() <= static_cast<std::size_t>(num_slots_), "layer ", layer,
              " asks for ", distinct.size(), " distinct experts but the cache has only ",
              num_slots_, " slots; stream them in waves of at most ", num_slots_);
  const int hits = pin_access_locked(layer, distinct, &slots, &loads);
  for (int s : slots) unpin_locked(s);
  return hits;
}

CacheStats SlabCache::replay(const ReplayArgs& a) {
  check_open("replay");
  check_sim("replay");
  MOERT_CHECK(a.steps >= 0, "replay: negative step count ", a.steps);
  MOERT_CHECK(a.k >= 0 && a.m >= 0 && a.a >= 0, "replay: negative width k=", a.k, " m=", a.m,
              " a=", a.a);
  MOERT_CHECK(a.steps == 0 || (a.layers != nullptr && a.experts != nullptr),
              "replay: layers and experts are required");
  MOERT_CHECK(a.hits_per_step != nullptr || a.steps == 0, "replay: no output buffer");
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::int32_t> distinct, slots, loads;
  // Validate everything first so that a bad row leaves the cache untouched.
  for (std::int64_t i = 0; i < a.steps; ++i) {
    const int layer = a.layers[i];
    MOERT_CHECK(layer >= 0 && layer < num_layers_, "replay: layers[", i, "]=", layer,
                " is out of range [0, ", num_layers_, ")");
    for (std::int64_t j = 0; j < a.k; ++j) {
      const int e = a.experts[i * a.k + j];
      MOERT_CHECK(e == -1 || (e >= 0 && e < num_experts_), "replay: experts[", i, ", ", j, "]=", e,
                  " is out of range [0, ", num_experts_, ") (use -1 for padding)");
      if (a.priorities != nullptr && e >= 0) {
        MOERT_CHECK(std::isfinite(a.priorities[i * a.k + j]), "replay: priorities[", i, ", ", j,
                    "] is not finite");
      }
    }
    if (a.k > num_slots_ && !a.waves) {
      distinct_locked(a.experts + i * a.k, a.k, true, &distinct);
      MOERT_CHECK(distinct.size() <= static_cast<std::size_t>(num_slots_), "replay: step ", i,
                  " asks for ", distinct.size(), " distinct experts but the cache has only ",
                  num_slots_, " slots");
    }
    if (a.prefetch != nullptr) {
      const int pl = a.prefetch_layers != nullptr ? a.prefetch_layers[i] : layer;
      MOERT_CHECK(pl >= 0 && pl < num_layers_, "replay: prefetch_layers[", i, "]=", pl,
                  " is out of range [0, ", num_layers_, ")");
      for (std::int64_t j = 0; j < a.m; ++j) {
        const int e = a.prefetch[i * a.m + j];
        MOERT_CHECK(e == -1 || (e >= 0 && e < num_experts_), "replay: prefetch[", i, ", ", j,
                    "]=", e, " is out of range [0, ", num_experts_, ") (use -1 for padding)");
      }
    }
    for (std::int64_t j = 0; a.after_scores != nullptr && j < num_experts_; ++j) {
      MOERT_CHECK(std::isfinite(a.after_scores[i * num_experts_ + j]), "replay: after_scores[", i,
                  ", ", j, "] is not finite");
    }
    for (std::int64_t j = 0; a.after_prefetch != nullptr && j < a.a; ++j) {
      const int e = a.after_prefetch[i * a.a + j];
      MOERT_CHECK(e == -1 || (e >= 0 && e < num_experts_), "replay: after_prefetch[", i, ", ", j,
                  "]=", e, " is out of range [0, ", num_experts_, ") (use -1 for padding)");
    }
  }
  const CacheStats before = stats_;
  for (std::int64_t i = 0; i < a.steps; ++i) {
    const int layer = a.layers[i];
    if (a.prefetch != nullptr) {
      const int pl = a.prefetch_layers != nullptr ? a.prefetch_layers[i] : layer;
      distinct_locked(a.prefetch + i * a.m, a.m, true, &distinct);
      const int queued = prefetch_locked(pl, distinct, &loads);
      if (a.prefetch_queued != nullptr) a.prefetch_queued[i] = queued;
    } else if (a.prefetch_queued != nullptr) {
      a.prefetch_queued[i] = 0;
    }
    distinct_locked(a.experts + i * a.k, a.k, true, &distinct);
    if (a.prefetch_used != nullptr) {
      std::int64_t* used = a.prefetch_used + i * a.k;
      std::fill(used, used + a.k, -1);
      for (int e : distinct) {  // first accesses of prefetched slots (pin_access marks them)
        const int s = table_[key_of(layer, e)];
        if (s >= 0 && slots_[s].prefetched && !slots_[s].accessed) *used++ = slots_[s].prefetch_seq;
      }
    }
    a.hits_per_step[i] = replay_access_locked(layer, &distinct, &slots, &loads);
    if (a.priorities != nullptr) {
      for (std::int64_t j = 0; j < a.k; ++j) {
        const int e = a.experts[i * a.k + j];
        if (e >= 0) set_priority_locked(layer, e, a.priorities[i * a.k + j]);
      }
    }
    if (a.after_scores != nullptr) {
      for (int e = 0; e < num_experts_; ++e) {
        set_priority_locked(layer, e, a.after_scores[i * num_experts_ + e]);
      }
    }
    if (a.after_prefetch != nullptr) {
      distinct_locked(a.after_prefetch + i * a.a, a.a, true, &distinct);
      const int queued = prefetch_locked(layer, distinct, &loads);
      if (a.prefetch_after_queued != nullptr) a.prefetch_after_queued[i] = queued;
    } else if (a.prefetch_after_queued != nullptr) {
      a.prefetch_after_queued[i] = 0;
    }
  }
  return stats_ - before;
}

int SlabCache::replay_access_locked(int layer, std::vector<std::int32_t>* distinct,
                                    std::vector<std::int32_t>* slots,
                                    std::vector<std::int32_t>* loads) {
  const auto n = static_cast<std::size_t>(num_slots_);
  if (distinct->size() <= n) {
    const int hits = pin_access_locked(layer, *distinct, slots, loads);
    for (int s : *slots) unpin_locked(s);
    return hits;
  }
  std::sort(distinct->begin(), distinct->end());
  std::stable_partition(distinct->begin(), distinct->end(),
                        [&](int e) { return table_[key_of(layer, e)] >= 0; });
  int hits = 0;
  std::vector<std::int32_t> wave;
  for (std::size_t w0 = 0; w0 < distinct->size(); w0 += n) {
    wave.assign(distinct->begin() + w0, distinct->begin() + std::min(w0 + n, distinct->size()));
    hits += pin_access_locked(layer, wave, slots, loads);
    for (int s : *slots) unpin_locked(s);
  }
  return hits;
}

std::int64_t SlabCache::prefetch_seq() {
  std::lock_guard<std::mutex> lock(mu_);
  return prefetch_seq_;
}

void SlabCache::close() {
  CopyEngine* engine = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    engine = engine_;
  }
  if (engine != nullptr) engine->close();
  closed_.store(true);
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

}  // namespace moert
