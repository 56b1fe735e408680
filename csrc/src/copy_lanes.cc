// CopyEngine's pipelined lanes (CUDA and the device model; see copy_engine.h): a worker issues
// copies without waiting for them, the lane's completion thread observes them in issue order.
#include <algorithm>
#include <chrono>
#include <deque>
#include <string>

#include "moert/common.h"
#include "moert/copy_engine.h"
#include "moert/faults.h"

namespace moert {

bool CopyEngine::can_take_locked(int lane) const {
  if (queue_.empty()) return false;
  const int load = lane_load_[lane];
  for (int other : lane_load_) {
    if (other < load) return false;  // a less loaded lane takes it
  }
  return queue_.top().cls == 0 || load < kPrefetchDepth;
}

void CopyEngine::issue_locked(std::unique_lock<std::mutex>& lk, int slot, int lane) {
  SlabCache::Slot& sl = c_.slots_[slot];
  sl.state = SlotState::kIssuing;
  c_.refresh_locked(slot);  // no longer cancellable
  c_.on_issue_locked(slot);
  ++in_flight_;
  ++lane_load_[lane];
  work_cv_.notify_all();  // the loads changed: a lane that waited for this one may take the next
  const bool wait_last_use = sl.last_use_recorded;
  sl.last_use_recorded = false;
  const Flight flight{slot, sl.key, sl.demanded, std::chrono::steady_clock::now()};
  const int layer = sl.key / c_.num_experts_;
  const int expert = sl.key % c_.num_experts_;
  ExpertPool& pool = *c_.pool_;
  void* dst = c_.slots_mem_ + static_cast<std::size_t>(slot) * c_.stride_;
  const StreamHandle stream = lanes_[lane];
  Event& ready = *ready_[slot];
  Event& last_use = *last_use_[slot];
  lk.unlock();

  std::string failure;
  const void* src = nullptr;
  try {
    // a tiered pool may read it from its file; its host slab stays pinned until the copy completes
    src = pool.acquire_host(layer, expert, flight.demand);
    // no kernel still reads the slot's previous expert when the bytes land
    if (wait_last_use) last_use.wait(stream);
    if (faults::armed()) {
      backend_.copy_async_faulty(dst, src, c_.slab_bytes_, stream, faults::next_copy());
    } else {
      backend_.copy_async(dst, src, c_.slab_bytes_, stream);
    }
    ready.record(stream);
  } catch (const std::exception& e) {
    failure = e.what();
  }

  lk.lock();
  if (failure.empty()) {
    sl.state = SlotState::kIssued;  // callers may go on: their streams wait on the ready event
    flights_[lane].push_back(flight);
    flight_cv_.notify_all();
  } else {
    if (src != nullptr) pool.release_host(layer, expert);
    --in_flight_;
    --lane_load_[lane];
    sl.last_use_recorded = wait_last_use;  // the next copy into the slot still waits for it
    fail_slot_locked(slot, cat("issuing it on lane ", lane, " failed: ", failure));
    work_cv_.notify_all();
  }
  c_.cv_.notify_all();
}

void CopyEngine::completer(int lane) {
  try {
    backend_.bind_thread();
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(c_.mu_);
    if (error_.empty()) error_ = e.what();
    c_.cv_.notify_all();
    return;
  }
  std::unique_lock<std::mutex> lk(c_.mu_);
  std::deque<Flight>& flights = flights_[lane];
  try {
    complete_flights(lk, lane, flights);
  } catch (const std::exception& e) {
    if (!lk.owns_lock()) lk.lock();
    lane_died_locked("completion thread", lane, -1, e.what());
  }
}

void CopyEngine::complete_flights(std::unique_lock<std::mutex>& lk, int lane,
                                  std::deque<Flight>& flights) {
  while (true) {
    flight_cv_.wait(lk, [&] { return !flights.empty() || lanes_stopped_; });
    if (flights.empty()) return;  // stopped and drained
    const Flight f = flights.front();
    Event& ready = *ready_[f.slot];
    lk.unlock();
    std::string failure;
    try {
      ready.synchronize();  // the lane's stream completes in order: the oldest copy first
    } catch (const std::exception& e) {
      failure = e.what();
    }
    const auto done = std::chrono::steady_clock::now();
    c_.pool_->release_host(f.key / c_.num_experts_, f.key % c_.num_experts_);  // the copy read it
    lk.lock();
    flights.pop_front();
    --in_flight_;
    --lane_load_[lane];
    if (failure.empty()) {
      handed_[f.slot] = 0;
      c_.on_ready_locked(f.slot);
      stats_.bytes += static_cast<std::int64_t>(c_.slab_bytes_);
      ++stats_.copies;
      ++(f.demand ? stats_.demand_copies : stats_.prefetch_copies);
      // the lane was busy from this copy's issue (or the previous completion) until now
      const auto from = std::max(f.issued, lane_done_[lane]);
      stats_.busy_s += std::chrono::duration<double>(done - from).count();
      lane_done_[lane] = done;
    } else {
      fail_slot_locked(f.slot, cat("the copy on lane ", lane, " failed: ", failure));
    }
    work_cv_.notify_all();
    c_.cv_.notify_all();
  }
}

}  // namespace moert
