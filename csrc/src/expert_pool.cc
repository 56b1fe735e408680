#include "moert/expert_pool.h"

#include <algorithm>
#include <cstring>

#include "moert/common.h"
#include "moert/faults.h"

namespace moert {

namespace {
constexpr std::size_t kPage = 4096;
std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }
}  // namespace

ExpertPool::ExpertPool(int num_layers, int num_experts, std::int64_t slab_bytes, bool pin)
    : ExpertPool(num_layers, num_experts, slab_bytes, pin,
                 static_cast<std::int64_t>(num_layers) * std::max(num_experts, 0), "lru", "pread") {
}

ExpertPool::ExpertPool(int num_layers, int num_experts, std::int64_t slab_bytes, bool pin,
                       std::int64_t capacity, const std::string& policy,
                       const std::string& read_mode)
    : num_layers_(num_layers), num_experts_(num_experts) {
  policy_ = policy;
  read_mode_ = read_mode;
  MOERT_CHECK(num_layers > 0, "num_layers must be positive, got ", num_layers);
  MOERT_CHECK(num_experts > 0, "num_experts must be positive, got ", num_experts);
  MOERT_CHECK(slab_bytes > 0, "slab_bytes must be positive, got ", slab_bytes);
  MOERT_CHECK(slab_bytes % static_cast<std::int64_t>(kSlabAlign) == 0, "slab_bytes=", slab_bytes,
              " is not a multiple of ", kSlabAlign, "; pad each expert's slab to ",
              round_up(static_cast<std::size_t>(slab_bytes), kSlabAlign), " bytes");
  const std::int64_t all = static_cast<std::int64_t>(num_layers) * num_experts;
  MOERT_CHECK(capacity >= 1 && capacity <= all, "capacity=", capacity,
              " host slabs is out of range; use 1..", all, " (every expert of every layer)");
  MOERT_CHECK(policy == "lru" || policy == "lfu" || policy == "fifo", "pool policy '", policy,
              "' is not one of lru, lfu, fifo");
  MOERT_CHECK(read_mode == "pread" || read_mode == "mmap", "read_mode '", read_mode,
              "' is not one of pread, mmap");
  slab_bytes_ = static_cast<std::size_t>(slab_bytes);
  stride_ = round_up(slab_bytes_, kStrideAlign);
  capacity_ = capacity;
  tiered_ = capacity < all;
  MOERT_CHECK(stride_ <= (std::size_t{1} << 46) / static_cast<std::size_t>(all), "pool of ", all,
              " entries x ", stride_, " bytes is too large");
  sources_.resize(static_cast<std::size_t>(all));
  layer_stats_.assign(num_layers, PoolStats{});
  if (tiered_) {
    slabs_.assign(static_cast<std::size_t>(capacity), HostSlot{});
    table_.assign(static_cast<std::size_t>(all), -1);
    ahead_queued_.assign(static_cast<std::size_t>(all), 0);
  }
  alloc(pin);
}

void ExpertPool::alloc(bool pin) {
  const std::size_t entries = static_cast<std::size_t>(capacity_);
  MOERT_CHECK(stride_ <= (std::size_t{1} << 46) / entries, "pool of ", entries, " entries x ",
              stride_, " bytes is too large");
  nbytes_ = entries * stride_;
  mapped_bytes_ = round_up(nbytes_, kPage);
  try {
    if (faults::armed()) faults::next_alloc(mapped_bytes_);
    base_ = static_cast<std::uint8_t*>(alloc_host_pages(mapped_bytes_));
  } catch (const RuntimeFailure& e) {
    throw RuntimeFailure(cat("ExpertPool of ", num_layers_, " layers x ", num_experts_,
                             " experts (", capacity_, " host slabs): ", e.what()));
  }
  if (pin) {
    try {
      pin_backend_ = make_backend("cuda");
      pin_backend_->pin_host(base_, mapped_bytes_);
    } catch (...) {
      free_host_pages(base_, mapped_bytes_);
      throw;
    }
    pinned_ = true;
  }
}

ExpertPool::~ExpertPool() {
  stop_readers();
  if (pinned_) pin_backend_->unpin_host(base_);
  free_host_pages(base_, mapped_bytes_);
  close_files();
}

void ExpertPool::check_open(const char* what) const {
  if (closed_.load()) throw RuntimeFailure(cat("ExpertPool.", what, ": the pool is closed"));
}

void ExpertPool::check_entry(int layer, int expert) const {
  MOERT_CHECK(layer >= 0 && layer < num_layers_, "layer ", layer, " is out of range [0, ",
              num_layers_, ")");
  MOERT_CHECK(expert >= 0 && expert < num_experts_, "expert ", expert, " is out of range [0, ",
              num_experts_, ")");
}

std::uintptr_t ExpertPool::address(int layer, int expert) const {
  check_open("address");
  check_entry(layer, expert);
  if (tiered_) {
    throw RuntimeFailure(
        cat("ExpertPool.address: the pool is a host cache of ", capacity_,
            " slabs over the checkpoint files (host_budget); its entries move, so ", "(layer ",
            layer, ", expert ", expert, ") has no fixed address: use copy_out"));
  }
  return reinterpret_cast<std::uintptr_t>(entry_ptr(layer, expert));
}

void ExpertPool::fill(int layer, int expert, std::uintptr_t src, std::int64_t nbytes,
                      std::int64_t offset) {
  check_open("fill");
  check_entry(layer, expert);
  if (tiered_) {
    throw RuntimeFailure(
        "ExpertPool.fill: a tiered pool (host_budget) reads its experts from "
        "their files (set_source); it cannot be filled from memory");
  }
  MOERT_CHECK(src != 0, "fill: source address is null");
  MOERT_CHECK(nbytes >= 0, "fill: nbytes must be >= 0, got ", nbytes);
  MOERT_CHECK(offset >= 0, "fill: offset must be >= 0, got ", offset);
  MOERT_CHECK(static_cast<std::size_t>(offset) + static_cast<std::size_t>(nbytes) <= slab_bytes_,
              "fill: offset ", offset, " + nbytes ", nbytes, " = ", offset + nbytes,
              " runs past the end of the ", slab_bytes_, "-byte slab of (layer ", layer,
              ", expert ", expert, ")");
  std::memcpy(const_cast<std::uint8_t*>(entry_ptr(layer, expert)) + offset,
              reinterpret_cast<const void*>(src), static_cast<std::size_t>(nbytes));
}

void ExpertPool::close() {
  closed_.store(true);
  stop_readers();  // a read in flight finishes first
}

}  // namespace moert
