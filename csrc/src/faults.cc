// The test-only fault plan (see faults.h).
#include "moert/faults.h"

#include <chrono>
#include <cmath>
#include <mutex>
#include <thread>

#include "moert/common.h"

namespace moert::faults {

std::atomic<bool> g_armed{false};

namespace {
std::mutex g_mu;
Plan g_plan;
Counts g_counts;

// Whether the n-th event (1-based) falls in [first, first + count) (count -1: unbounded).
bool hit(std::int64_t n, std::int64_t first, std::int64_t count) {
  return first > 0 && n >= first && (count < 0 || n < first + count);
}
}  // namespace

void arm(const Plan& p) {
  MOERT_CHECK(p.fail_copy >= 0, "faults: fail_copy=", p.fail_copy, " must be >= 0 (0: off)");
  MOERT_CHECK(p.fail_count == -1 || p.fail_count >= 1, "faults: fail_count=", p.fail_count,
              " must be >= 1, or -1 for every later copy");
  MOERT_CHECK(std::isfinite(p.slow) && p.slow >= 1.0, "faults: slow=", p.slow,
              " must be a factor >= 1");
  MOERT_CHECK(p.kill_lane >= 0, "faults: kill_lane=", p.kill_lane, " must be >= 0 (0: off)");
  MOERT_CHECK(p.fail_alloc >= 0, "faults: fail_alloc=", p.fail_alloc, " must be >= 0 (0: off)");
  MOERT_CHECK(p.alloc_count == -1 || p.alloc_count >= 1, "faults: alloc_count=", p.alloc_count,
              " must be >= 1, or -1 for every later allocation");
  MOERT_CHECK(std::isfinite(p.read_delay_s) && p.read_delay_s >= 0.0 && p.read_delay_s <= 60.0,
              "faults: read_delay_s=", p.read_delay_s, " must be in [0, 60] seconds");
  std::lock_guard<std::mutex> lock(g_mu);
  g_plan = p;
  g_counts = Counts{};
  g_armed.store(true);
}

void disarm() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_armed.store(false);
  g_plan = Plan{};
}

Counts counts() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_counts;
}

CopyFault next_copy() {
  std::lock_guard<std::mutex> lock(g_mu);
  CopyFault f;
  f.index = ++g_counts.copies;
  f.fail = hit(f.index, g_plan.fail_copy, g_plan.fail_count);
  f.slow = g_plan.slow;
  if (f.fail) ++g_counts.failed_copies;
  if (f.slow > 1.0) ++g_counts.slowed_copies;
  return f;
}

bool next_lane_request() {
  std::lock_guard<std::mutex> lock(g_mu);
  const std::int64_t n = ++g_counts.lane_requests;
  const bool dies = g_plan.kill_lane > 0 && n == g_plan.kill_lane;
  if (dies) ++g_counts.killed_lanes;
  return dies;
}

void next_alloc(std::size_t bytes) {
  std::int64_t n = 0;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    n = ++g_counts.allocations;
    if (!hit(n, g_plan.fail_alloc, g_plan.alloc_count)) return;
    ++g_counts.failed_allocations;
  }
  throw RuntimeFailure(
      cat("allocation of ", bytes, " bytes failed (injected fault: allocation #", n, ")"));
}

void next_read() {
  double delay = 0.0;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    delay = g_plan.read_delay_s;
    if (delay > 0.0) ++g_counts.delayed_reads;
  }
  if (delay > 0.0) std::this_thread::sleep_for(std::chrono::duration<double>(delay));
}

void add_slow_seconds(double seconds) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_counts.slow_s += seconds;
}

}  // namespace moert::faults
