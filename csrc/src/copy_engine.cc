#include "moert/copy_engine.h"

#include <chrono>
#include <cmath>

#include "moert/common.h"
#include "moert/faults.h"

namespace moert {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
}  // namespace

CopyEngine::CopyEngine(std::shared_ptr<SlabCache> cache, int num_streams, double slot_timeout_s)
    : cache_(std::move(cache)),
      c_(*cache_),
      backend_(*cache_->backend_),
      slot_timeout_s_(slot_timeout_s) {
  MOERT_CHECK(num_streams >= 1 && num_streams <= 16, "num_streams=", num_streams,
              " is out of range; use 1..16");
  MOERT_CHECK(slot_timeout_s > 0, "slot_timeout_s must be positive, got ", slot_timeout_s);
  {
    std::lock_guard<std::mutex> lock(c_.mu_);
    c_.check_open("(used by CopyEngine)");
    MOERT_CHECK(c_.engine_ == nullptr,
                "this SlabCache already has an open CopyEngine; close that one first");
    c_.engine_ = this;
  }
  try {
    for (int i = 0; i < c_.num_slots_; ++i) {
      ready_.push_back(backend_.create_event());
      last_use_.push_back(backend_.create_event());
    }
    for (int i = 0; i < num_streams; ++i) lanes_.push_back(backend_.create_stream());
    if (auto probe = backend_.create_timing_event()) {
      device_timing_ = true;
      spare_timing_.push_back(std::move(probe));
    }
  } catch (...) {
    for (StreamHandle s : lanes_) backend_.destroy_stream(s);
    std::lock_guard<std::mutex> lock(c_.mu_);
    c_.engine_ = nullptr;
    throw;
  }
  stats_.lanes = num_streams;
  layer_stats_.assign(c_.num_layers_, EngineLayerStats{});
  slot_error_.assign(c_.num_slots_, std::string());
  handed_.assign(c_.num_slots_, 0);
  async_copies_ = backend_.device_index() >= 0;
  flights_.resize(num_streams);
  lane_load_.assign(num_streams, 0);
  lane_done_.assign(num_streams, Clock::time_point{});
  for (int i = 0; i < num_streams; ++i) workers_.emplace_back([this, i] { worker(i); });
  if (async_copies_) {
    for (int i = 0; i < num_streams; ++i) completers_.emplace_back([this, i] { completer(i); });
  }
}

CopyEngine::~CopyEngine() {
  try {
    close();
  } catch (...) {
  }
}

void CopyEngine::check_usable_locked(const char* what) {
  if (closed_.load()) throw RuntimeFailure(cat("CopyEngine.", what, ": the engine is closed"));
  if (!error_.empty()) throw RuntimeFailure(cat("CopyEngine.", what, ": ", error_));
  if (!report_.empty()) {
    std::string r;
    r.swap(report_);
    throw RuntimeFailure(cat("CopyEngine.", what, ": ", r));
  }
  c_.check_open(what);
}

void CopyEngine::push_locked(int cls, int slot) {
  queue_.push(Request{cls, ++seq_, slot, c_.slots_[slot].gen});
}

void CopyEngine::add_stall_locked(int layer, double seconds) {
  stats_.demand_stall_s += seconds;
  layer_stats_[layer].demand_stall_s += seconds;
}

bool CopyEngine::pending_locked() const {
  if (in_flight_ > 0) return true;
  for (const auto& sl : c_.slots_) {
    if (sl.state == SlotState::kLoading || sl.state == SlotState::kIssuing ||
        sl.state == SlotState::kIssued) {
      return true;
    }
  }
  return false;
}

void CopyEngine::worker(int lane) {
  std::unique_lock<std::mutex> lk(c_.mu_, std::defer_lock);
  int held = -1;  // the slot whose request this thread took and has not handed on yet
  try {
    backend_.bind_thread();
    lk.lock();
    while (true) {
      work_cv_.wait(
          lk, [&] { return stop_ || (async_copies_ ? can_take_locked(lane) : !queue_.empty()); });
      if (stop_) return;
      const Request req = queue_.top();
      queue_.pop();
      SlabCache::Slot& sl = c_.slots_[req.slot];
      if (sl.gen != req.gen || sl.state != SlotState::kLoading) {
        ++stats_.stale_requests;
        continue;
      }
      held = req.slot;
      if (faults::armed() && faults::next_lane_request()) {
        throw RuntimeFailure(cat("injected fault: copy lane ", lane, "'s thread died"));
      }
      held = -1;  // from here the copy's own failure path owns the slot
      if (async_copies_) {
        issue_locked(lk, req.slot, lane);
      } else {
        copy_locked(lk, req.slot);
      }
    }
  } catch (const std::exception& e) {
    if (!lk.owns_lock()) lk.lock();
    lane_died_locked("worker thread", lane, held, e.what());
  }
}

void CopyEngine::lane_died_locked(const char* thread, int lane, int slot, const std::string& why) {
  if (error_.empty()) {
    error_ = cat("copy lane ", lane, "'s ", thread, " stopped: ", why,
                 "; this engine cannot copy any more: close it and open a new one");
  }
  if (slot >= 0 && c_.slots_[slot].key >= 0 && c_.slots_[slot].state == SlotState::kLoading) {
    fail_slot_locked(slot, error_);
  }
  work_cv_.notify_all();
  pred_cv_.notify_all();
  c_.cv_.notify_all();
}

void CopyEngine::fail_slot_locked(int slot, const std::string& why) {
  SlabCache::Slot& sl = c_.slots_[slot];
  ++stats_.failed_copies;
  slot_error_[slot] = cat("the copy of (layer ", c_.layer_of(sl.key), ", expert ",
                          sl.key % c_.num_experts_, ") into slot ", slot, " failed (", why, ")");
  if (handed_[slot]) {
    report_ = cat(slot_error_[slot], " after acquire returned; what was computed from it is wrong");
    handed_[slot] = 0;
  }
  c_.fail_locked(slot);
  c_.cv_.notify_all();
}

int CopyEngine::pinned_slot_locked(int layer, int expert) const {
  const int key = c_.key_of(layer, expert);
  const int s = c_.table_[key];
  if (s >= 0 && c_.slots_[s].pins > 0) return s;
  for (int i = 0; i < c_.num_slots_; ++i) {  // rare: only after a failed copy
    const SlabCache::Slot& sl = c_.slots_[i];
    if (sl.failed && sl.key == key && sl.pins > 0) return i;
  }
  return -1;
}

void CopyEngine::copy_locked(std::unique_lock<std::mutex>& lk, int slot) {
  SlabCache::Slot& sl = c_.slots_[slot];
  sl.state = SlotState::kIssuing;
  c_.refresh_locked(slot);  // no longer cancellable
  c_.on_issue_locked(slot);
  ++in_flight_;
  const bool wait_last_use = sl.last_use_recorded;
  sl.last_use_recorded = false;
  const bool demand = sl.demanded;
  const int layer = sl.key / c_.num_experts_;
  const int expert = sl.key % c_.num_experts_;
  ExpertPool& pool = *c_.pool_;
  void* dst = c_.slots_mem_ + static_cast<std::size_t>(slot) * c_.stride_;
  const std::size_t bytes = c_.slab_bytes_;
  Event& ready = *ready_[slot];
  Event& last_use = *last_use_[slot];
  lk.unlock();

  const auto t0 = Clock::now();
  std::string failure;
  const void* src = nullptr;
  try {
    src = pool.acquire_host(layer, expert, demand);  // a tiered pool may read it from its file
    if (wait_last_use) last_use.wait(0);
    if (faults::armed()) {
      backend_.copy_async_faulty(dst, src, bytes, 0, faults::next_copy());
    } else {
      backend_.copy_async(dst, src, bytes, 0);
    }
    ready.record(0);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (failure.empty()) {
    try {
      ready.synchronize();
    } catch (const std::exception& e) {
      failure = e.what();
    }
  }
  if (src != nullptr) pool.release_host(layer, expert);
  const double busy = seconds_since(t0);

  lk.lock();
  --in_flight_;
  if (failure.empty()) {
    c_.on_ready_locked(slot);
    stats_.bytes += static_cast<std::int64_t>(bytes);
    ++stats_.copies;
    ++(demand ? stats_.demand_copies : stats_.prefetch_copies);
    stats_.busy_s += busy;
  } else {
    sl.last_use_recorded = wait_last_use;  // the next copy into the slot still waits for it
    fail_slot_locked(slot, failure);
  }
  c_.cv_.notify_all();
}

void CopyEngine::set_read_ahead(int k) {
  MOERT_CHECK(k >= 0 && k <= 64, "read_ahead=", k, " is out of range; use 0 (off) .. 64 layers");
  read_ahead_.store(k);
}

void CopyEngine::read_ahead_locked(int layer, const std::vector<std::int32_t>& experts,
                                   bool only_queued) {
  ExpertPool& pool = *c_.pool_;
  if (!pool.tiered() || experts.empty()) return;
  std::vector<std::int32_t> want;
  for (int e : experts) {
    const int s = c_.table_[c_.key_of(layer, e)];
    const SlotState st = s < 0 ? SlotState::kEmpty : c_.slots_[s].state;
    if (only_queued ? st == SlotState::kLoading : st != SlotState::kReady) want.push_back(e);
  }
  if (!want.empty()) pool.read_ahead(layer, want.data(), static_cast<std::int64_t>(want.size()));
}

int CopyEngine::prefetch(int layer, const std::int32_t* experts, std::int64_t n) {
  std::lock_guard<std::mutex> lock(c_.mu_);
  check_usable_locked("prefetch");
  c_.check_layer(layer);
  std::vector<std::int32_t> distinct, queued;
  c_.distinct_locked(experts, n, false, &distinct);
  c_.prefetch_locked(layer, distinct, &queued);
  if (read_ahead_.load() > 0) read_ahead_locked(layer, distinct, true);
  for (int s : queued) push_locked(1, s);
  if (!queued.empty()) work_cv_.notify_all();
  return static_cast<int>(queued.size());
}

void CopyEngine::check_prediction_args(const std::int32_t* layers, std::int64_t n,
                                       const std::int32_t* ids, std::int64_t width,
                                       const std::int32_t* clear, std::int64_t n_clear) const {
  MOERT_CHECK(n >= 0 && width >= 0 && n_clear >= 0, "predict: negative size (layers ", n,
              ", width ", width, ", clear ", n_clear, ")");
  MOERT_CHECK(n == 0 || layers != nullptr, "predict: layer list is null");
  MOERT_CHECK(n_clear == 0 || clear != nullptr, "predict: clear list is null");
  MOERT_CHECK(n * width == 0 || ids != nullptr, "predict: the id buffer is null");
  for (std::int64_t i = 0; i < n; ++i) c_.check_layer(layers[i]);
  for (std::int64_t i = 0; i < n_clear; ++i) c_.check_layer(clear[i]);
}

int CopyEngine::apply_prediction_locked(const std::vector<std::int32_t>& layers,
                                        const std::int32_t* ids, std::int64_t width,
                                        const float* scores, const std::vector<std::int32_t>& clear,
                                        float clear_score) {
  const int E = c_.num_experts_;
  MOERT_CHECK(std::isfinite(clear_score), "predict: clear_score ", clear_score, " is not finite");
  if (scores != nullptr) {
    for (std::size_t i = 0; i < layers.size() * static_cast<std::size_t>(E); ++i) {
      MOERT_CHECK(std::isfinite(scores[i]), "predict: score ", scores[i], " of layer ",
                  layers[i / E], ", expert ", i % E, " is not finite");
    }
  }
  std::vector<std::int32_t> distinct, queued;
  // Validate every id row before changing anything.
  for (std::size_t i = 0; i < layers.size(); ++i) {
    c_.distinct_locked(ids + i * width, width, true, &distinct);
  }
  for (int layer : clear) {
    for (int e = 0; e < E; ++e) c_.set_priority_locked(layer, e, clear_score);
  }
  if (scores != nullptr) {
    for (std::size_t i = 0; i < layers.size(); ++i) {
      for (int e = 0; e < E; ++e) c_.set_priority_locked(layers[i], e, scores[i * E + e]);
    }
  }
  int total = 0;
  const int ahead = read_ahead_.load();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    c_.distinct_locked(ids + i * width, width, true, &distinct);
    c_.prefetch_locked(layers[i], distinct, &queued);
    if (ahead > 0) read_ahead_locked(layers[i], distinct, i > static_cast<std::size_t>(ahead));
    for (int s : queued) push_locked(1, s);
    total += static_cast<int>(queued.size());
  }
  if (total > 0) work_cv_.notify_all();
  ++stats_.predictions;
  return total;
}

int CopyEngine::predict(const std::int32_t* layers, std::int64_t n, const std::int32_t* ids,
                        std::int64_t width, const float* scores, const std::int32_t* clear,
                        std::int64_t n_clear, float clear_score) {
  std::lock_guard<std::mutex> lock(c_.mu_);
  check_usable_locked("predict");
  check_prediction_args(layers, n, ids, width, clear, n_clear);
  return apply_prediction_locked(std::vector<std::int32_t>(layers, layers + n), ids, width, scores,
                                 std::vector<std::int32_t>(clear, clear + n_clear), clear_score);
}

std::uint64_t CopyEngine::predict_async(const std::int32_t* layers, std::int64_t n,
                                        const std::int32_t* ids, std::int64_t width,
                                        const float* scores, const std::int32_t* clear,
                                        std::int64_t n_clear, float clear_score,
                                        StreamHandle stream) {
  std::unique_ptr<Event> event;
  {
    std::lock_guard<std::mutex> lock(c_.mu_);
    check_usable_locked("predict_async");
    check_prediction_args(layers, n, ids, width, clear, n_clear);
    if (!spare_events_.empty()) {
      event = std::move(spare_events_.back());
      spare_events_.pop_back();
    }
  }
  if (!event) event = backend_.create_event();
  event->record(stream);  // after the caller's device-to-host copy of ids and scores
  std::lock_guard<std::mutex> lock(c_.mu_);
  check_usable_locked("predict_async");
  if (!predictor_.joinable()) predictor_ = std::thread([this] { prediction_worker(); });
  Prediction p{std::vector<std::int32_t>(layers, layers + n),
               ids,
               width,
               scores,
               std::vector<std::int32_t>(clear, clear + n_clear),
               clear_score,
               std::move(event),
               ++submitted_};
  predictions_.push_back(std::move(p));
  pred_cv_.notify_all();
  return submitted_;
}

void CopyEngine::prediction_worker() {
  try {
    backend_.bind_thread();
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(c_.mu_);
    error_ = e.what();
    applied_ = submitted_;
    pred_cv_.notify_all();
    c_.cv_.notify_all();
    return;
  }
  std::unique_lock<std::mutex> lk(c_.mu_);
  while (true) {
    pred_cv_.wait(lk, [&] { return stop_ || !predictions_.empty(); });
    if (stop_) return;
    Prediction p = std::move(predictions_.front());
    predictions_.pop_front();
    lk.unlock();
    const auto t0 = Clock::now();
    std::string failure;
    try {
      p.event->synchronize();  // the predicted ids have reached host memory
    } catch (const std::exception& e) {
      failure = e.what();
    }
    const double waited = seconds_since(t0);
    lk.lock();
    stats_.prediction_wait_s += waited;
    if (failure.empty() && !stop_ && error_.empty()) {
      try {
        apply_prediction_locked(p.layers, p.ids, p.width, p.scores, p.clear, p.clear_score);
      } catch (const std::exception& e) {
        failure = e.what();
      }
    }
    if (!failure.empty() && error_.empty()) error_ = cat("prediction ", p.ticket, ": ", failure);
    applied_ = p.ticket;
    spare_events_.push_back(std::move(p.event));
    pred_cv_.notify_all();
    c_.cv_.notify_all();
  }
}

std::uint64_t CopyEngine::predictions_done() {
  std::lock_guard<std::mutex> lock(c_.mu_);
  return applied_;
}

void CopyEngine::wait_predictions(std::uint64_t ticket) {
  std::unique_lock<std::mutex> lk(c_.mu_);
  MOERT_CHECK(ticket <= submitted_, "wait_predictions: ticket ", ticket, " was never issued (last ",
              submitted_, ")");
  pred_cv_.wait(lk, [&] { return applied_ >= ticket || stop_ || !error_.empty(); });
  check_usable_locked("wait_predictions");
}

std::vector<std::int32_t> CopyEngine::acquire(int layer, const std::int32_t* experts,
                                              std::int64_t n, StreamHandle stream, bool wait,
                                              std::vector<std::uint8_t>* pending) {
  const auto t0 = Clock::now();
  std::unique_lock<std::mutex> lk(c_.mu_);
  check_usable_locked("acquire");
  c_.check_layer(layer);
  std::vector<std::int32_t> distinct, slots, loads;
  c_.distinct_locked(experts, n, false, &distinct);
  MOERT_CHECK(distinct.size() <= static_cast<std::size_t>(c_.num_slots_), "acquire: layer ", layer,
              " asks for ", distinct.size(), " distinct experts but the cache has only ",
              c_.num_slots_, " slots; stream them in waves of at most ", c_.num_slots_);

  // All or nothing: pin only once every miss can get a slot, so waiting never holds pins.
  bool waited = false;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(slot_timeout_s_));
  while (!c_.can_place_locked(layer, distinct)) {
    waited = true;
    if (c_.cv_.wait_until(lk, deadline) == std::cv_status::timeout &&
        !c_.can_place_locked(layer, distinct)) {
      throw RuntimeFailure(cat("CopyEngine.acquire: waited ", slot_timeout_s_, " s for slots for ",
                               distinct.size(), " experts of layer ", layer, "; all ",
                               c_.num_slots_, " slots stay pinned (acquired, not released). ",
                               "Release experts before acquiring more, or use more slots"));
    }
    check_usable_locked("acquire");
  }
  c_.pin_access_locked(layer, distinct, &slots, &loads);
  ++stats_.acquires;
  ++layer_stats_[layer].acquires;
  std::vector<std::uint32_t> gens(slots.size());
  for (std::size_t i = 0; i < slots.size(); ++i) gens[i] = c_.slots_[slots[i]].gen;
  const bool host_copies = !async_copies_;
  // The CPU twin's caller copies its own demand loads when it waits for them anyway (no hand-off
  // to a worker thread); deferred waits hand them to the workers, to overlap the caller's compute.
  const bool caller_copies = host_copies && wait;
  // The host itself as the stream (CPU twin, the device model's handle 0) waits until the copies
  // are complete; a device stream only until they are issued, then waits on their ready events.
  const bool host_waits = backend_.is_host_stream(stream);
  bool pushed = false;
  if (!caller_copies) {
    for (int s : loads) {
      push_locked(0, s);
      pushed = true;
    }
  }
  for (int s : slots) {
    SlabCache::Slot& sl = c_.slots_[s];
    if (sl.state == SlotState::kLoading && !sl.demanded) {  // promote a queued prefetch
      sl.demanded = true;
      c_.refresh_locked(s);
      push_locked(0, s);
      pushed = true;
    }
  }
  if (pushed) work_cv_.notify_all();

  auto unpin_all = [&] {
    for (std::size_t i = 0; i < slots.size(); ++i) {
      SlabCache::Slot& sl = c_.slots_[slots[i]];
      if (sl.gen == gens[i] && sl.pins > 0) c_.unpin_locked(slots[i]);
    }
    c_.cv_.notify_all();
  };
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) out[i] = c_.table_[c_.key_of(layer, experts[i])];
  if (!wait) {
    if (pending != nullptr) {
      pending->assign(static_cast<std::size_t>(n), 0);
      for (std::int64_t i = 0; i < n; ++i) {
        (*pending)[i] = c_.slots_[out[i]].state != SlotState::kReady ? 1 : 0;
      }
    }
    if (waited) add_stall_locked(layer, seconds_since(t0));
    return out;
  }
  if (caller_copies) {
    // Queued prefetches of this call's experts were promoted above and stay with the workers.
    for (std::size_t i = 0; i < loads.size(); ++i) {
      const int s = loads[i];
      if (c_.slots_[s].state != SlotState::kLoading) continue;
      copy_locked(lk, s);
      waited = true;  // a demand stall: the caller's compute waited for this copy
    }
  }
  try {
    waited = wait_slots_locked(lk, slots, host_waits ? SlotState::kReady : SlotState::kIssued,
                               "acquire") ||
             waited;
  } catch (...) {
    unpin_all();
    throw;
  }
  if (waited) add_stall_locked(layer, seconds_since(t0));
  if (!host_waits) {
    try {
      stream_wait_locked(slots, stream);
    } catch (...) {
      unpin_all();
      throw;
    }
  }
  return out;
}

void CopyEngine::wait_ready(int layer, const std::int32_t* experts, std::int64_t n,
                            StreamHandle stream) {
  const auto t0 = Clock::now();
  std::unique_lock<std::mutex> lk(c_.mu_);
  check_usable_locked("wait_ready");
  c_.check_layer(layer);
  std::vector<std::int32_t> distinct, slots;
  c_.distinct_locked(experts, n, false, &distinct);
  for (int e : distinct) {
    const int s = pinned_slot_locked(layer, e);
    MOERT_CHECK(s >= 0, "wait_ready: (layer ", layer, ", expert ", e,
                ") is not acquired; call acquire(..., wait=False) first");
    slots.push_back(s);
  }
  const bool host_waits = backend_.is_host_stream(stream);
  if (wait_slots_locked(lk, slots, host_waits ? SlotState::kReady : SlotState::kIssued,
                        "wait_ready")) {
    add_stall_locked(layer, seconds_since(t0));
  }
  if (!host_waits) stream_wait_locked(slots, stream);
}

bool CopyEngine::wait_slots_locked(std::unique_lock<std::mutex>& lk,
                                   const std::vector<std::int32_t>& slots, SlotState need,
                                   const char* what) {
  auto done = [&] {
    for (int s : slots) {
      if (c_.slots_[s].failed) throw RuntimeFailure(cat("CopyEngine.", what, ": ", slot_error_[s]));
      if (c_.slots_[s].state < need) return false;
    }
    return true;
  };
  bool waited = false;
  while (!done()) {
    if (closed_.load() || !error_.empty() || c_.closed()) {
      check_usable_locked(what);
      throw RuntimeFailure(cat("CopyEngine.", what, ": the engine was closed while waiting"));
    }
    waited = true;
    c_.cv_.wait(lk);
  }
  return waited;
}

void CopyEngine::stream_wait_locked(const std::vector<std::int32_t>& slots, StreamHandle stream) {
  // Time the stream's wait only when a copy may still be running (a ready slot's event is long
  // complete and costs the stream nothing).
  bool pending = false;
  for (int s : slots) pending = pending || c_.slots_[s].state != SlotState::kReady;
  std::unique_ptr<Event> before, after;
  if (pending && device_timing_) {
    before = take_timing_event_locked();
    after = take_timing_event_locked();
    before->record(stream);
  }
  for (int s : slots) {
    if (c_.slots_[s].state != SlotState::kReady) handed_[s] = 1;  // a failure is reported later
    ready_[s]->wait(stream);
  }
  if (after) {
    after->record(stream);
    stall_marks_.emplace_back(std::move(before), std::move(after));
    ++stats_.device_stall_waits;
  }
  harvest_stalls_locked(false);
}

std::unique_ptr<Event> CopyEngine::take_timing_event_locked() {
  if (spare_timing_.empty()) return backend_.create_timing_event();
  std::unique_ptr<Event> e = std::move(spare_timing_.back());
  spare_timing_.pop_back();
  return e;
}

void CopyEngine::harvest_stalls_locked(bool block) {
  // Marks complete in stream order per stream; with several caller streams an unfinished older
  // mark only delays the harvest of newer ones. A stream far behind the host (more marks than
  // this) is waited for rather than letting the marks grow without bound.
  constexpr std::size_t kMaxMarks = 4096;
  if (block && !stall_marks_.empty()) stall_marks_.back().second->synchronize();
  while (!stall_marks_.empty()) {
    auto& [before, after] = stall_marks_.front();
    if (!after->query()) {
      if (stall_marks_.size() < kMaxMarks) break;
      after->synchronize();
    }
    stats_.device_stall_s += after->seconds_since(*before);
    spare_timing_.push_back(std::move(before));
    spare_timing_.push_back(std::move(after));
    stall_marks_.pop_front();
  }
}

void CopyEngine::release(int layer, const std::int32_t* experts, std::int64_t n,
                         StreamHandle stream) {
  std::lock_guard<std::mutex> lock(c_.mu_);
  // Not check_usable_locked: after a failure, release still returns what the caller holds.
  if (closed_.load()) throw RuntimeFailure("CopyEngine.release: the engine is closed");
  c_.check_open("release");
  c_.check_layer(layer);
  std::vector<std::int32_t> distinct, slots;
  c_.distinct_locked(experts, n, false, &distinct);
  for (int e : distinct) {
    const int s = pinned_slot_locked(layer, e);
    MOERT_CHECK(s >= 0, "release: (layer ", layer, ", expert ", e, ") is not acquired");
    slots.push_back(s);
  }
  for (int s : slots) {
    SlabCache::Slot& sl = c_.slots_[s];
    // Several holders may release on different streams: chain them so the event covers all.
    if (sl.last_use_recorded) last_use_[s]->wait(stream);
    last_use_[s]->record(stream);
    sl.last_use_recorded = true;
    c_.unpin_locked(s);
  }
  ++stats_.releases;
  c_.cv_.notify_all();
  if (!report_.empty()) {  // released all the same
    std::string r;
    r.swap(report_);
    throw RuntimeFailure(cat("CopyEngine.release: ", r));
  }
}

void CopyEngine::synchronize() {
  std::unique_lock<std::mutex> lk(c_.mu_);
  check_usable_locked("synchronize");
  while (pending_locked()) {
    c_.cv_.wait(lk);
    check_usable_locked("synchronize");
  }
}

EngineStats CopyEngine::stats(bool wait_device) {
  std::lock_guard<std::mutex> lock(c_.mu_);
  if (!closed_.load()) harvest_stalls_locked(wait_device);
  EngineStats s = stats_;
  s.queued = static_cast<std::int64_t>(queue_.size());
  return s;
}

StatsSnapshot CopyEngine::snapshot(bool wait_device) {
  std::lock_guard<std::mutex> lock(c_.mu_);
  if (!closed_.load()) harvest_stalls_locked(wait_device);
  StatsSnapshot out{stats_, layer_stats_, c_.stats_, c_.layer_stats_};
  out.engine.queued = static_cast<std::int64_t>(queue_.size());
  return out;
}

void CopyEngine::reset_stats() {
  std::lock_guard<std::mutex> lock(c_.mu_);
  const int lanes = stats_.lanes;
  stats_ = EngineStats{};
  stats_.lanes = lanes;
  layer_stats_.assign(layer_stats_.size(), EngineLayerStats{});
}

void CopyEngine::close() {
  {
    std::lock_guard<std::mutex> lock(c_.mu_);
    if (closed_.exchange(true)) return;
    stop_ = true;
    // Cancel what no lane has taken yet; copies in flight finish before the workers exit.
    while (!queue_.empty()) {
      const Request r = queue_.top();
      queue_.pop();
      SlabCache::Slot& sl = c_.slots_[r.slot];
      if (sl.gen != r.gen || sl.state != SlotState::kLoading) continue;
      if (sl.prefetched && !sl.accessed) {
        const int layer = c_.layer_of(sl.key);
        c_.count_locked(layer, &CacheStats::prefetch_cancelled);
        c_.count_locked(layer, &CacheStats::prefetch_wasted);
      }
      c_.table_[sl.key] = -1;
      sl.key = -1;
      sl.state = SlotState::kEmpty;
      sl.prefetched = sl.accessed = sl.demanded = false;
      sl.pins = 0;
      ++sl.gen;
      c_.refresh_locked(r.slot);
      c_.free_.insert(r.slot);
    }
    // Requests not applied yet are dropped: their host buffers may be gone after close.
    predictions_.clear();
    applied_ = submitted_;
    work_cv_.notify_all();
    pred_cv_.notify_all();
    c_.cv_.notify_all();
  }
  if (predictor_.joinable()) predictor_.join();
  for (auto& w : workers_) {
    if (w.joinable()) w.join();
  }
  {
    std::lock_guard<std::mutex> lock(c_.mu_);
    lanes_stopped_ = true;  // the copies in flight complete before the completion threads exit
    flight_cv_.notify_all();
  }
  for (auto& t : completers_) {
    if (t.joinable()) t.join();
  }
  for (StreamHandle s : lanes_) backend_.destroy_stream(s);
  std::lock_guard<std::mutex> lock(c_.mu_);
  if (c_.engine_ == this) c_.engine_ = nullptr;
  c_.cv_.notify_all();
}

}  // namespace moert
