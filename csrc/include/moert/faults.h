// Test-only fault injection (tests/engine/test_native_faults.py): one process-wide plan that makes
// the n-th expert copy fail or take k times longer, the copy lane that takes the n-th copy request
// die, or the n-th pool / slot-arena allocation fail. Counts start when the plan is armed. Off (the
// default) every hook costs one relaxed atomic load.
//
//   copies       counted by CopyEngine as it starts each copy (CPU twin: the caller's or a worker's
//                memcpy; device model and CUDA: a lane issuing it). A failing copy fails at issue
//                on the CPU twin (and CUDA), and on its stream in the device model, where the ready
//                event recorded after it reports the failure (as CUDA reports an asynchronous one).
//                A slow copy lasts k times its time: modelled time in the device model, an added
//                sleep of (k - 1) times the memcpy on the CPU twin (counted in slow_s); CUDA
//                ignores it.
//   lane death   the worker thread of the lane that takes the n-th copy request exits by an
//                exception while holding that request, as a thread that dies mid-work would.
//   allocations  ExpertPool's host memory and SlabCache's slot arena, on any device.
//   file reads   a tiered ExpertPool's reads of an expert from its files sleep read_delay_s first
//                (a slow disk: reads and read-aheads stay in flight long enough to be waited on).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace moert {

// What happens to one copy (CopyEngine passes it to Backend::copy_async_faulty).
struct CopyFault {
  std::int64_t index = 0;  // the copy's number since the plan was armed
  bool fail = false;
  double slow = 1.0;  // duration factor, >= 1
};

namespace faults {

struct Plan {
  std::int64_t fail_copy = 0;    // the n-th copy from arming fails (1 = the next); 0: none
  std::int64_t fail_count = 1;   // ... and the fail_count - 1 after it (-1: every later copy)
  double slow = 1.0;             // every copy takes this many times as long (>= 1)
  std::int64_t kill_lane = 0;    // the lane that takes the n-th copy request dies; 0: none
  std::int64_t fail_alloc = 0;   // the n-th allocation from arming fails; 0: none
  std::int64_t alloc_count = 1;  // ... and the alloc_count - 1 after it (-1: every later one)
  double read_delay_s = 0.0;     // every expert file read sleeps this long first (>= 0)
};

struct Counts {
  std::int64_t copies = 0;  // copies seen since arming
  std::int64_t failed_copies = 0;
  std::int64_t slowed_copies = 0;
  double slow_s = 0.0;  // host seconds the CPU twin slept for slowed copies
  std::int64_t lane_requests = 0;
  std::int64_t killed_lanes = 0;
  std::int64_t allocations = 0;
  std::int64_t failed_allocations = 0;
  std::int64_t delayed_reads = 0;
};

extern std::atomic<bool> g_armed;
inline bool armed() { return g_armed.load(std::memory_order_relaxed); }

// Validates the plan (ArgumentError naming the field), zeroes the counts and arms it.
void arm(const Plan& plan);
void disarm();
Counts counts();

// Hooks; call only when armed().
CopyFault next_copy();
// True when the lane taking this copy request is to die.
bool next_lane_request();
// Throws RuntimeFailure("allocation of N bytes failed (injected fault: allocation #n)") when this
// allocation is to fail.
void next_alloc(std::size_t bytes);
void add_slow_seconds(double seconds);
// Sleeps read_delay_s (a tiered pool's file read).
void next_read();

}  // namespace faults
}  // namespace moert
