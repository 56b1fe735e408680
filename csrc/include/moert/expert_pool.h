// ExpertPool: every expert of every MoE layer in one page-aligned host allocation.
//
// Entry (layer, expert) lives at base + (layer * num_experts + expert) * stride, where stride is
// slab_bytes rounded up to 256 bytes. The caller lays out an expert's bytes (gate_up then down,
// contiguous) so that one copy moves one expert; the pool only stores slabs. When pinned, the
// whole allocation is page-locked with cuMemHostRegister (never torch's pin_memory, which rounds
// the size up to a power of two).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "moert/backend.h"

namespace moert {

class ExpertPool {
 public:
  static constexpr std::size_t kStrideAlign = 256;
  static constexpr std::size_t kSlabAlign = 16;

  // Throws ArgumentError for non-positive counts or a slab size that is 0 or not a multiple of
  // 16, RuntimeFailure when memory or pinning (no CUDA device) fails.
  ExpertPool(int num_layers, int num_experts, std::int64_t slab_bytes, bool pin);
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
