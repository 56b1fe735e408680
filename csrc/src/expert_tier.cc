// ExpertPool's host tier (see expert_pool.h): expert sources in checkpoint files, reads with
// pread or from a read-only mmap, and the tiered pool's slabs as a cache (lru / lfu).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "moert/common.h"
#include "moert/expert_pool.h"
#include "moert/faults.h"

namespace moert {

namespace {
using Clock = std::chrono::steady_clock;

std::int64_t mtime_ns(const struct stat& st) {
  return static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

// How long acquire_host waits for a host slab while every one stays pinned.
constexpr double kSlabTimeoutS = 60.0;
}  // namespace

void ExpertPool::close_files() {
  for (File& f : files_) {
    if (f.map != nullptr)
      munmap(const_cast<std::uint8_t*>(f.map), static_cast<std::size_t>(f.size));
    if (f.fd >= 0) ::close(f.fd);
    f.map = nullptr;
    f.fd = -1;
  }
}

int ExpertPool::add_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open("add_file");
  File f;
  f.path = path;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) {
    throw RuntimeFailure(cat("cannot open checkpoint file ", path, ": ", std::strerror(errno)));
  }
  struct stat st{};
  if (fstat(f.fd, &st) != 0) {
    const int err = errno;
    ::close(f.fd);
    throw RuntimeFailure(cat("cannot stat checkpoint file ", path, ": ", std::strerror(err)));
  }
  f.size = static_cast<std::int64_t>(st.st_size);
  f.mtime_ns = mtime_ns(st);
  f.inode = static_cast<std::uint64_t>(st.st_ino);
  if (read_mode_ == "mmap" && f.size > 0) {
    void* m = mmap(nullptr, static_cast<std::size_t>(f.size), PROT_READ, MAP_SHARED, f.fd, 0);
    if (m == MAP_FAILED) {
      const int err = errno;
      ::close(f.fd);
      throw RuntimeFailure(cat("cannot mmap checkpoint file ", path, ": ", std::strerror(err)));
    }
    f.map = static_cast<const std::uint8_t*>(m);
  }
  files_.push_back(f);
  return static_cast<int>(files_.size()) - 1;
}

void ExpertPool::set_source(int layer, int expert, const std::vector<SourcePart>& parts) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open("set_source");
  check_entry(layer, expert);
  MOERT_CHECK(!parts.empty(), "set_source: (layer ", layer, ", expert ", expert, ") has no parts");
  for (const SourcePart& p : parts) {
    MOERT_CHECK(p.file >= 0 && p.file < static_cast<int>(files_.size()), "set_source: file id ",
                p.file, " was never added (", files_.size(), " files)");
    const File& f = files_[p.file];
    MOERT_CHECK(p.length > 0 && p.file_offset >= 0 && p.file_offset + p.length <= f.size,
                "set_source: bytes [", p.file_offset, ", ", p.file_offset + p.length,
                ") of (layer ", layer, ", expert ", expert, ") lie outside ", f.path, " (", f.size,
                " bytes)");
    MOERT_CHECK(
        p.slab_offset >= 0 && static_cast<std::size_t>(p.slab_offset + p.length) <= slab_bytes_,
        "set_source: slab bytes [", p.slab_offset, ", ", p.slab_offset + p.length, ") of (layer ",
        layer, ", expert ", expert, ") run past the ", slab_bytes_, "-byte slab");
  }
  sources_[static_cast<std::size_t>(layer) * num_experts_ + expert] = parts;
}

void ExpertPool::read_source(int key, std::uint8_t* dst) {
  std::vector<SourcePart> parts;
  std::vector<File> files;
  {
    std::lock_guard<std::mutex> lock(mu_);
    parts = sources_[key];
    files = files_;
  }
  const int layer = key / num_experts_, expert = key % num_experts_;
  if (faults::armed()) faults::next_read();
  if (parts.empty()) {
    throw RuntimeFailure(cat("ExpertPool: (layer ", layer, ", expert ", expert,
                             ") has no source in the checkpoint files (set_source)"));
  }
  int checked = -1;
  for (const SourcePart& p : parts) {
    const File& f = files[p.file];
    if (p.file != checked) {  // parts of one file are adjacent: one stat per file and read
      struct stat st{};
      if (::stat(f.path.c_str(), &st) != 0) {
        throw RuntimeFailure(cat("checkpoint file ", f.path, " vanished after loading (",
                                 std::strerror(errno), "); expert (layer ", layer, ", expert ",
                                 expert, ") cannot be read: restore the file and load again"));
      }
      if (static_cast<std::int64_t>(st.st_size) != f.size || mtime_ns(st) != f.mtime_ns ||
          static_cast<std::uint64_t>(st.st_ino) != f.inode) {
        throw RuntimeFailure(cat("checkpoint file ", f.path, " changed after loading (size ",
                                 f.size, " -> ", static_cast<std::int64_t>(st.st_size),
                                 ", or its mtime/inode); expert (layer ", layer, ", expert ",
                                 expert, ") would read other bytes: load the model again"));
      }
      checked = p.file;
    }
    std::uint8_t* out = dst + p.slab_offset;
    if (f.map != nullptr) {
      std::memcpy(out, f.map + p.file_offset, static_cast<std::size_t>(p.length));
      continue;
    }
    std::int64_t done = 0;
    while (done < p.length) {
      const ssize_t n = ::pread(f.fd, out + done, static_cast<std::size_t>(p.length - done),
                                static_cast<off_t>(p.file_offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        throw RuntimeFailure(
            cat("reading ", p.length, " bytes at offset ", p.file_offset, " of ", f.path,
                " failed: ", n == 0 ? "unexpected end of file" : std::strerror(errno)));
      }
      done += n;
    }
  }
}

int ExpertPool::victim_locked() const {
  int best = -1;
  for (int s = 0; s < static_cast<int>(slabs_.size()); ++s) {
    const HostSlot& h = slabs_[s];
    if (h.state == 0) return s;
    if (h.state != 2 || h.pins > 0) continue;
    if (best < 0) {
      best = s;
      continue;
    }
    const HostSlot& b = slabs_[best];
    bool better;
    if (policy_ == "lfu") {
      better = h.freq != b.freq ? h.freq < b.freq : h.tick < b.tick;
    } else if (policy_ == "fifo") {
      better = h.born < b.born;
    } else {
      better = h.tick < b.tick;
    }
    if (better) best = s;
  }
  return best;
}

double ExpertPool::fill_locked(std::unique_lock<std::mutex>& lk, int key, int v, bool ahead,
                               std::string* failure) {
  HostSlot& h = slabs_[v];
  if (h.key >= 0) {
    const int old_layer = h.key / num_experts_;
    table_[h.key] = -1;
    ++stats_.evictions;
    ++layer_stats_[old_layer].evictions;
    if (h.ahead) ++stats_.ahead_wasted, ++layer_stats_[old_layer].ahead_wasted;
  }
  h.key = key;
  h.state = 1;
  h.pins = 0;
  h.ahead = ahead;
  table_[key] = v;
  lk.unlock();
  const auto t0 = Clock::now();
  try {
    read_source(key, slab_ptr(v));
  } catch (const std::exception& e) {
    *failure = e.what();
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  lk.lock();
  cv_.notify_all();
  if (!failure->empty()) {
    h.key = -1;
    h.state = 0;
    h.ahead = false;
    table_[key] = -1;
    return secs;
  }
  h.state = 2;
  h.tick = ++tick_;
  h.born = h.tick;
  h.freq = 0;
  const int layer = key / num_experts_;
  for (PoolStats* st : {&stats_, &layer_stats_[layer]}) {
    ++st->reads;
    st->read_bytes += static_cast<std::int64_t>(slab_bytes_);
    st->read_s += secs;
    if (ahead) ++st->ahead_reads;
  }
  return secs;
}

int ExpertPool::take_locked(std::unique_lock<std::mutex>& lk, int key, bool pin, bool demand) {
  const int layer = key / num_experts_;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(kSlabTimeoutS));
  bool waited = false, waited_ahead = false;
  const auto t_start = Clock::now();
  while (true) {
    check_open("acquire_host");
    const int s = table_[key];
    int v = -1;
    if (s >= 0 && slabs_[s].state == 2) {
      HostSlot& h = slabs_[s];
      h.tick = ++tick_;
      if (pin) {
        ++h.freq;
        ++h.pins;
        ++stats_.hits;
        ++layer_stats_[layer].hits;
        if (h.ahead) ++stats_.ahead_used, ++layer_stats_[layer].ahead_used;
        h.ahead = false;
      }
      if (waited) ++stats_.waits, ++layer_stats_[layer].waits;
      if (waited_ahead) {
        const double w = std::chrono::duration<double>(Clock::now() - t_start).count();
        for (PoolStats* st : {&stats_, &layer_stats_[layer]}) {
          ++st->ahead_waits;
          if (demand) st->ahead_wait_s += w;
        }
      }
      return s;
    }
    if (s < 0) v = victim_locked();
    if (v < 0) {  // another thread reads this expert, or every slab is pinned
      waited = true;
      waited_ahead = waited_ahead || (s >= 0 && slabs_[s].ahead);
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
        throw RuntimeFailure(cat("ExpertPool: waited ", kSlabTimeoutS, " s for a host slab for ",
                                 "(layer ", layer, ", expert ", key % num_experts_, "); all ",
                                 capacity_, " slabs stay pinned by copies in flight: raise ",
                                 "host_budget"));
      }
      continue;
    }
    std::string failure;
    const double secs = fill_locked(lk, key, v, false, &failure);
    if (!failure.empty()) throw RuntimeFailure(failure);
    HostSlot& h = slabs_[v];
    h.freq = pin ? 1 : 0;
    h.pins = pin ? 1 : 0;
    for (PoolStats* st : {&stats_, &layer_stats_[layer]}) {
      if (demand) ++st->demand_reads, st->demand_read_s += secs;
      if (waited) ++st->waits;
    }
    return v;
  }
}

int ExpertPool::read_ahead(int layer, const std::int32_t* experts, std::int64_t n) {
  check_open("read_ahead");
  check_entry(layer, 0);
  for (std::int64_t i = 0; i < n; ++i) {
    MOERT_CHECK(experts[i] < num_experts_, "read_ahead: expert ", experts[i],
                " is out of range [0, ", num_experts_, ")");
  }
  if (!tiered_) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  if (readers_.empty()) {
    for (int i = 0; i < num_readers_; ++i) readers_.emplace_back([this] { reader(); });
  }
  const std::size_t bound = static_cast<std::size_t>(capacity_);  // more would evict each other
  int queued = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (experts[i] < 0) continue;
    const int key = layer * num_experts_ + experts[i];
    if (table_[key] >= 0 || ahead_queued_[key]) continue;
    if (ahead_queue_.size() >= bound) {  // the oldest request is the stalest prediction
      const int old = ahead_queue_.front();
      ahead_queue_.pop_front();
      ahead_queued_[old] = 0;
      ++stats_.ahead_dropped;
      ++layer_stats_[old / num_experts_].ahead_dropped;
    }
    ahead_queue_.push_back(key);
    ahead_queued_[key] = 1;
    ++queued;
  }
  if (queued > 0) ahead_cv_.notify_all();
  return queued;
}

void ExpertPool::set_readers(int n) {
  MOERT_CHECK(n >= 1 && n <= 16, "readers=", n, " is out of range; use 1..16");
  std::lock_guard<std::mutex> lock(mu_);
  MOERT_CHECK(readers_.empty(), "set_readers: the reader threads already run (set it before the ",
              "first read_ahead)");
  num_readers_ = n;
}

void ExpertPool::reader() {
  std::unique_lock<std::mutex> lk(mu_);
  while (true) {
    ahead_cv_.wait(lk, [&] { return readers_stop_ || !ahead_queue_.empty(); });
    if (readers_stop_) return;
    const int key = ahead_queue_.front();
    ahead_queue_.pop_front();
    ahead_queued_[key] = 0;
    const int v = table_[key] >= 0 ? -1 : victim_locked();
    if (v < 0) {  // resident or being read by now, or no slab free of pins: never wait
      ++stats_.ahead_dropped;
      ++layer_stats_[key / num_experts_].ahead_dropped;
      continue;
    }
    std::string failure;  // a failed read-ahead frees its slab; the next demand read raises
    fill_locked(lk, key, v, true, &failure);
  }
}

void ExpertPool::stop_readers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    readers_stop_ = true;
    ahead_queue_.clear();
    std::fill(ahead_queued_.begin(), ahead_queued_.end(), 0);
    ahead_cv_.notify_all();
  }
  for (std::thread& t : readers_) {
    if (t.joinable()) t.join();
  }
}

std::int64_t ExpertPool::load(int layer, int expert) {
  check_open("load");
  check_entry(layer, expert);
  const int key = layer * num_experts_ + expert;
  if (!tiered_) {
    read_source(key, const_cast<std::uint8_t*>(entry_ptr(layer, expert)));
    return static_cast<std::int64_t>(slab_bytes_);
  }
  std::unique_lock<std::mutex> lk(mu_);
  const std::int64_t before = stats_.reads;
  take_locked(lk, key, false, false);
  return stats_.reads > before ? static_cast<std::int64_t>(slab_bytes_) : 0;
}

const std::uint8_t* ExpertPool::acquire_host(int layer, int expert, bool demand) {
  if (!tiered_) return entry_ptr(layer, expert);
  std::unique_lock<std::mutex> lk(mu_);
  return slab_ptr(take_locked(lk, layer * num_experts_ + expert, true, demand));
}

void ExpertPool::release_host(int layer, int expert) {
  if (!tiered_) return;
  std::lock_guard<std::mutex> lock(mu_);
  const int s = table_[layer * num_experts_ + expert];
  if (s >= 0 && slabs_[s].pins > 0) --slabs_[s].pins;
  cv_.notify_all();
}

void ExpertPool::copy_out(int layer, int expert, std::uintptr_t dst) {
  check_open("copy_out");
  check_entry(layer, expert);
  MOERT_CHECK(dst != 0, "copy_out: destination address is null");
  auto* out = reinterpret_cast<std::uint8_t*>(dst);
  const int key = layer * num_experts_ + expert;
  if (!tiered_) {
    std::memcpy(out, entry_ptr(layer, expert), slab_bytes_);
    return;
  }
  std::unique_lock<std::mutex> lk(mu_);
  const int s = table_[key];
  if (s >= 0 && slabs_[s].state == 2) {
    ++slabs_[s].pins;
    lk.unlock();
    std::memcpy(out, slab_ptr(s), slab_bytes_);
    lk.lock();
    --slabs_[s].pins;
    cv_.notify_all();
    return;
  }
  lk.unlock();
  read_source(key, out);  // not resident: straight from the file, the cache untouched
}

std::vector<std::uint8_t> ExpertPool::resident(int layer) {
  check_entry(layer, 0);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(num_experts_), 1);
  if (!tiered_) return out;
  std::lock_guard<std::mutex> lock(mu_);
  for (int e = 0; e < num_experts_; ++e) {
    const int s = table_[layer * num_experts_ + e];
    out[e] = s >= 0 && slabs_[s].state == 2 ? 1 : 0;
  }
  return out;
}

PoolStats ExpertPool::stats(std::vector<PoolStats>* layers) {
  std::lock_guard<std::mutex> lock(mu_);
  if (layers != nullptr) *layers = layer_stats_;
  return stats_;
}

void ExpertPool::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = PoolStats{};
  layer_stats_.assign(layer_stats_.size(), PoolStats{});
}

}  // namespace moert
