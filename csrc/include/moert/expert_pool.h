// ExpertPool: every expert of every MoE layer in one page-aligned host allocation.
//
// Entry (layer, expert) lives at base + (layer * num_experts + expert) * stride, where stride is
// slab_bytes rounded up to 256 bytes. The caller lays out an expert's bytes (gate_up then down,
// contiguous) so that one copy moves one expert; the pool only stores slabs. When pinned, the
// whole allocation is page-locked with cuMemHostRegister (never torch's pin_memory, which rounds
// the size up to a power of two).
//
// Tiered pool (capacity < layers * experts; expert_tier.cc): the pool is a cache of `capacity`
// host slabs over the checkpoint's files. Each expert has a source (file, offset, length, slab
// offset per part, registered with set_source); acquire_host returns the expert's slab, reading
// it from its files with pread (or memcpy from a read-only mmap) into a free or evicted host slab
// first when it is not resident. A slab is pinned from acquire_host until release_host (the
// device copy that reads it is complete) and never evicted while pinned. Victims among unpinned
// resident slabs: lru (last use) or lfu (uses since read, then last use). Before every read the
// file is stat'ed by path: a size, mtime or inode that differs from the one registered raises
// RuntimeFailure naming the file (never wrong bytes). The untiered pool reads nothing and its
// acquire_host is entry_ptr.
//
// Read-ahead (tiered): read_ahead(layer, experts) queues file reads of experts not resident and
// returns at once; the pool's reader threads (started by the first call) read them into free or
// evicted unpinned slabs, with no device copy. A slab being read is in the table (state reading),
// so an acquire_host / load of that expert waits for the read in flight instead of reading again.
// A request is dropped (ahead_dropped) when its expert is resident or being read by then, when
// every slab is pinned or being read (a reader never waits for a slab), or when newer requests
// push it out of the queue (at most `capacity` wait). A slab read ahead counts as used
// (ahead_used) when a copy first pins it, as wasted (ahead_wasted) when evicted unused. A failed
// read-ahead frees its slab silently; the expert's next read raises the error.
// Victims: lru (last use), lfu (uses since read, then last use), fifo (time of read).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moert/backend.h"

namespace moert {

// Counters of the host tier (tiered pool), in total or for one layer.
struct PoolStats {
  std::int64_t hits = 0;           // acquire_host found the expert resident
  std::int64_t reads = 0;          // experts read from their files (SSD reads)
  std::int64_t read_bytes = 0;     // bytes read from files
  double read_s = 0.0;             // seconds spent reading (summed over threads)
  std::int64_t demand_reads = 0;   // ... of which for demand copies
  double demand_read_s = 0.0;      // seconds of those (a stall of the layer that needed them)
  std::int64_t evictions = 0;      // resident experts dropped for a read
  std::int64_t waits = 0;          // acquire_host calls that waited (a read in progress, no slab)
  std::int64_t ahead_reads = 0;    // ... reads done by read_ahead (included in reads)
  std::int64_t ahead_used = 0;     // slabs read ahead that a copy pinned before their eviction
  std::int64_t ahead_wasted = 0;   // slabs read ahead and evicted unused
  std::int64_t ahead_dropped = 0;  // read_ahead requests not read (see the header comment)
  std::int64_t ahead_waits = 0;    // acquire_host calls that waited on a read-ahead in flight
  double ahead_wait_s = 0.0;       // ... seconds of those for demand copies (a stall, like
                                   // demand_read_s)
};

// One contiguous byte range of an expert in a checkpoint file.
struct SourcePart {
  std::int32_t file = 0;
  std::int64_t file_offset = 0;
  std::int64_t length = 0;
  std::int64_t slab_offset = 0;
};

class ExpertPool {
 public:
  static constexpr std::size_t kStrideAlign = 256;
  static constexpr std::size_t kSlabAlign = 16;

  // Throws ArgumentError for non-positive counts or a slab size that is 0 or not a multiple of
  // 16, RuntimeFailure when memory or pinning (no CUDA device) fails.
  ExpertPool(int num_layers, int num_experts, std::int64_t slab_bytes, bool pin);
  // Tiered when capacity < num_layers * num_experts (capacity >= 1); policy "lru", "lfu", "fifo";
  // read_mode "pread" or "mmap".
  ExpertPool(int num_layers, int num_experts, std::int64_t slab_bytes, bool pin,
             std::int64_t capacity, const std::string& policy, const std::string& read_mode);
  ~ExpertPool();
  ExpertPool(const ExpertPool&) = delete;
  ExpertPool& operator=(const ExpertPool&) = delete;

  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  std::size_t slab_bytes() const { return slab_bytes_; }
  std::size_t stride() const { return stride_; }
  std::size_t nbytes() const { return nbytes_; }
  bool pinned() const { return pinned_; }
  bool closed() const { return closed_.load(); }
  bool tiered() const { return tiered_; }
  std::int64_t capacity() const { return capacity_; }
  const std::string& policy() const { return policy_; }
  const std::string& read_mode() const { return read_mode_; }

  // Sources (both modes). add_file opens `path` and records its size, mtime (ns) and inode as
  // they are now; returns its id. set_source gives expert (layer, expert) its parts; every
  // expert of a tiered pool needs one before it is acquired.
  int add_file(const std::string& path);
  void set_source(int layer, int expert, const std::vector<SourcePart>& parts);
  // Reads the expert from its files into its entry (untiered) or into a host slab (tiered; a
  // no-op when resident), as acquire_host would but without pinning. Returns bytes read.
  std::int64_t load(int layer, int expert);
  // The expert's slab, pinned (tiered) until release_host; reads it first when not resident.
  const std::uint8_t* acquire_host(int layer, int expert, bool demand);
  void release_host(int layer, int expert);
  // Tiered: queues reads of the experts (ids < 0 skipped) that are neither resident, being read,
  // nor queued; returns how many were queued (0 untiered). Never blocks on a read.
  int read_ahead(int layer, const std::int32_t* experts, std::int64_t n);
  // Reader threads for read_ahead (1..16, default 1); only before the first read_ahead.
  void set_readers(int n);
  int readers() const { return num_readers_; }
  // Copies the expert's slab (resident or read from its files) to dst (slab_bytes bytes).
  void copy_out(int layer, int expert, std::uintptr_t dst);
  // Per expert of `layer`: 1 when resident in the host tier (all 1 untiered).
  std::vector<std::uint8_t> resident(int layer);
  PoolStats stats(std::vector<PoolStats>* layers = nullptr);
  void reset_stats();

  // Checks the range of layer and expert (ArgumentError naming both) and that the pool is open.
  void check_entry(int layer, int expert) const;
  std::uintptr_t address(int layer, int expert) const;
  // Pointer for the copy engine; no closed check (caches keep the memory alive).
  const std::uint8_t* entry_ptr(int layer, int expert) const {
    return base_ + (static_cast<std::size_t>(layer) * num_experts_ + expert) * stride_;
  }
  std::uintptr_t base_address() const { return reinterpret_cast<std::uintptr_t>(base_); }

  // Copies nbytes from host address src into entry (layer, expert) at byte offset `offset`.
  void fill(int layer, int expert, std::uintptr_t src, std::int64_t nbytes, std::int64_t offset);

  // Marks the pool closed: later calls raise RuntimeFailure. The memory itself is returned when
  // the last owner (caches built on it, tensor views) is gone, so no view can dangle.
  void close();
  void check_open(const char* what) const;

 private:
  struct File {
    std::string path;
    int fd = -1;
    std::int64_t size = 0;
    std::int64_t mtime_ns = 0;
    std::uint64_t inode = 0;
    const std::uint8_t* map = nullptr;  // read_mode "mmap"
  };
  struct HostSlot {
    std::int32_t key = -1;
    std::uint8_t state = 0;  // 0 empty, 1 reading, 2 resident
    std::int32_t pins = 0;
    std::uint64_t tick = 0;
    std::uint64_t freq = 0;
    std::uint64_t born = 0;  // tick of its read (fifo)
    bool ahead = false;      // read by read_ahead and not pinned by a copy since
  };
  void alloc(bool pin);
  void close_files();
  // Reads key's parts into dst; throws RuntimeFailure naming the file. No lock held.
  void read_source(int key, std::uint8_t* dst);
  // Tiered: the host slab of key, resident and (with pin) pinned; reads it first when not
  // resident (the lock released meanwhile); waits while another thread reads it or every slab is
  // pinned. Returns the slab index. `demand` counts the read as a demand read.
  int take_locked(std::unique_lock<std::mutex>& lk, int key, bool pin, bool demand);
  int victim_locked() const;
  // Reads key into slab v (a victim; its old entry is evicted) with the lock released meanwhile;
  // the slab is in the table, state reading, during the read. Returns the read's seconds; on a
  // failure frees the slab and returns the error in *failure.
  double fill_locked(std::unique_lock<std::mutex>& lk, int key, int v, bool ahead,
                     std::string* failure);
  void reader();
  void stop_readers();
  std::uint8_t* slab_ptr(int slab) const {
    return base_ + static_cast<std::size_t>(slab) * stride_;
  }

  bool tiered_ = false;
  std::int64_t capacity_ = 0;
  std::string policy_ = "lru";
  std::string read_mode_ = "pread";
  std::vector<File> files_;
  std::vector<std::vector<SourcePart>> sources_;  // key -> parts
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<HostSlot> slabs_;
  std::vector<std::int32_t> table_;  // key -> slab or -1
  // read_ahead: queued keys (oldest first), per key whether queued, the reader threads.
  std::deque<std::int32_t> ahead_queue_;
  std::vector<std::uint8_t> ahead_queued_;
  std::vector<std::thread> readers_;
  std::condition_variable ahead_cv_;
  bool readers_stop_ = false;
  int num_readers_ = 1;
  std::uint64_t tick_ = 0;
  PoolStats stats_;
  std::vector<PoolStats> layer_stats_;
  int num_layers_;
  int num_experts_;
  std::size_t slab_bytes_;
  std::size_t stride_;
  std::size_t nbytes_;
  std::size_t mapped_bytes_;
  std::uint8_t* base_ = nullptr;
  bool pinned_ = false;
  std::unique_ptr<Backend> pin_backend_;
  std::atomic<bool> closed_{false};
};

}  // namespace moert
