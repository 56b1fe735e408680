// The only file in csrc/ that knows Python. Maps moert::ArgumentError to ValueError and
// moert::RuntimeFailure to RuntimeError. Tensors cross as addresses, byte counts, stream handles
// and numpy arrays; every call that can block or copy many bytes releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moert/backend_sim.h"
#include "moert/common.h"
#include "moert/copy_engine.h"
#include "moert/cuda_probe.h"
#include "moert/expert_pool.h"
#include "moert/faults.h"
#include "moert/reuse_forecast.h"
#include "moert/slab_cache.h"

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using Int32Array = py::array_t<std::int32_t, py::array::c_style>;
using Int32CastArray = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;
using Float32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Float64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>;

std::vector<double> values_of(const Float64Array& a) {
  return std::vector<double>(a.data(), a.data() + a.size());
}

// A 1-D list of expert ids, narrowed to int32 with a range check (no silent wrap-around).
std::vector<std::int32_t> expert_ids(const Int64Array& a, const char* what) {
  MOERT_CHECK(a.ndim() == 1, what, " must be 1-D, got ", a.ndim(), " dimensions");
  std::vector<std::int32_t> out(static_cast<std::size_t>(a.shape(0)));
  const std::int64_t* p = a.data();
  for (std::size_t i = 0; i < out.size(); ++i) {
    MOERT_CHECK(p[i] >= std::numeric_limits<std::int32_t>::min() &&
                    p[i] <= std::numeric_limits<std::int32_t>::max(),
                what, "[", i, "]=", p[i], " is out of range");
    out[i] = static_cast<std::int32_t>(p[i]);
  }
  return out;
}

int to_int(std::int64_t v, const char* what) {
  MOERT_CHECK(v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max(), what,
              "=", v, " is out of range");
  return static_cast<int>(v);
}

py::dict cache_stats_dict(const moert::CacheStats& s) {
  py::dict d;
  for (const auto& field : moert::CacheStats::fields()) d[field.first] = s.*field.second;
  return d;
}

// {counter: (L,) array}, row l of every counter from rows[l].
template <typename T, typename Row>
py::array_t<T> column(const std::vector<Row>& rows, T Row::* field) {
  py::array_t<T> out(static_cast<py::ssize_t>(rows.size()));
  T* o = out.mutable_data();
  for (std::size_t l = 0; l < rows.size(); ++l) o[l] = rows[l].*field;
  return out;
}

py::dict cache_layer_dict(const std::vector<moert::CacheStats>& rows) {
  py::dict d;
  for (const auto& field : moert::CacheStats::fields()) d[field.first] = column(rows, field.second);
  return d;
}

py::dict engine_layer_dict(const std::vector<moert::EngineLayerStats>& rows) {
  py::dict d;
  d["acquires"] = column(rows, &moert::EngineLayerStats::acquires);
  d["demand_stall_s"] = column(rows, &moert::EngineLayerStats::demand_stall_s);
  return d;
}

py::dict engine_stats_dict(const moert::EngineStats& s) {
  py::dict d;
  d["bytes"] = s.bytes;
  d["copies"] = s.copies;
  d["demand_copies"] = s.demand_copies;
  d["prefetch_copies"] = s.prefetch_copies;
  d["acquires"] = s.acquires;
  d["releases"] = s.releases;
  d["stale_requests"] = s.stale_requests;
  d["queued"] = s.queued;
  d["busy_s"] = s.busy_s;
  d["demand_stall_s"] = s.demand_stall_s;
  d["device_stall_s"] = s.device_stall_s;
  d["device_stall_waits"] = s.device_stall_waits;
  d["failed_copies"] = s.failed_copies;
  d["predictions"] = s.predictions;
  d["prediction_wait_s"] = s.prediction_wait_s;
  d["lanes"] = s.lanes;
  return d;
}

// The device model behind a "sim" cache (tests, benchmarks); holds the cache, so the model lives
// as long as the handle.
struct SimDeviceRef {
  std::shared_ptr<moert::SlabCache> cache;
  moert::SimBackend* dev;
};

// An event of the device model; holds the cache like SimDeviceRef.
struct SimEventRef {
  std::shared_ptr<moert::SlabCache> cache;
  std::unique_ptr<moert::Event> event;
};

SimDeviceRef sim_device_of(const std::shared_ptr<moert::SlabCache>& c) {
  MOERT_CHECK(!c->simulated(),
              "sim_device: a simulated cache (SlabCache.simulated) has no device; ",
              "make a SlabCache with device='sim'");
  auto* dev = dynamic_cast<moert::SimBackend*>(c->backend());
  MOERT_CHECK(dev != nullptr, "sim_device: this cache's device is '", c->device(),
              "'; only a cache made with device='sim' has the device model");
  return SimDeviceRef{c, dev};
}

py::dict sim_config_dict(const moert::SimConfig& c) {
  py::dict d;
  d["bandwidth_gbs"] = c.bandwidth_gbs;
  d["latency_us"] = c.latency_us;
  d["jitter_us"] = c.jitter_us;
  d["seed"] = c.seed;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using moert::CacheStats;
  using moert::CopyEngine;
  using moert::ExpertPool;
  using moert::SlabCache;

  m.doc() = "moert native runtime: expert pool, slab cache, copy engine (CPU twin + CUDA)";
  py::register_exception<moert::ArgumentError>(m, "ArgumentError", PyExc_ValueError);
  py::register_exception<moert::RuntimeFailure>(m, "RuntimeFailure", PyExc_RuntimeError);

  m.def("cuda_compiled", &moert::cuda_compiled, "True when the CUDA backend was compiled in.");
  m.def(
      "cuda_probe",
      []() {
        auto p = moert::cuda_probe();
        py::dict d;
        d["device_count"] = p.device_count;
        d["error_code"] = p.error_code;
        d["message"] = p.message;
        d["driver_version"] = p.driver_version;
        d["library"] = p.library;
        return d;
      },
      "Load the CUDA driver and count its devices (the first CUDA call; never raises).");

  // The test-only fault plan (moert/faults.h; Python: moert.engine.faults).
  m.def(
      "faults_arm",
      [](std::int64_t fail_copy, std::int64_t fail_count, double slow, std::int64_t kill_lane,
         std::int64_t fail_alloc, std::int64_t alloc_count, double read_delay_s) {
        moert::faults::arm(moert::faults::Plan{fail_copy, fail_count, slow, kill_lane, fail_alloc,
                                               alloc_count, read_delay_s});
      },
      py::arg("fail_copy") = 0, py::arg("fail_count") = 1, py::arg("slow") = 1.0,
      py::arg("kill_lane") = 0, py::arg("fail_alloc") = 0, py::arg("alloc_count") = 1,
      py::arg("read_delay_s") = 0.0);
  m.def("faults_disarm", &moert::faults::disarm);
  m.def("faults_armed", &moert::faults::armed);
  m.def("faults_counts", []() {
    const moert::faults::Counts c = moert::faults::counts();
    py::dict d;
    d["copies"] = c.copies;
    d["failed_copies"] = c.failed_copies;
    d["slowed_copies"] = c.slowed_copies;
    d["slow_s"] = c.slow_s;
    d["lane_requests"] = c.lane_requests;
    d["killed_lanes"] = c.killed_lanes;
    d["allocations"] = c.allocations;
    d["failed_allocations"] = c.failed_allocations;
    d["delayed_reads"] = c.delayed_reads;
    return d;
  });

  py::class_<ExpertPool, std::shared_ptr<ExpertPool>>(m, "ExpertPool")
      .def(py::init([](std::int64_t layers, std::int64_t experts, std::int64_t slab_bytes, bool pin,
                       std::int64_t capacity, const std::string& policy,
                       const std::string& read_mode) {
             const int l = to_int(layers, "num_layers"), e = to_int(experts, "num_experts");
             const std::int64_t cap = capacity < 0 ? static_cast<std::int64_t>(l) * e : capacity;
             return std::make_shared<ExpertPool>(l, e, slab_bytes, pin, cap, policy, read_mode);
           }),
           py::arg("num_layers"), py::arg("num_experts"), py::arg("slab_bytes"), py::arg("pin"),
           py::arg("capacity") = -1, py::arg("policy") = "lru", py::arg("read_mode") = "pread")
      .def_property_readonly("tiered", &ExpertPool::tiered)
      .def_property_readonly("capacity", &ExpertPool::capacity)
      .def_property_readonly("policy", &ExpertPool::policy)
      .def_property_readonly("read_mode", &ExpertPool::read_mode)
      .def("add_file", &ExpertPool::add_file, py::arg("path"))
      .def(
          "set_source",
          [](ExpertPool& p, std::int64_t layer, std::int64_t expert, const Int64Array& parts) {
            MOERT_CHECK(parts.ndim() == 2 && parts.shape(1) == 4,
                        "set_source: parts must be (n, 4) rows of (file, file_offset, length, "
                        "slab_offset)");
            std::vector<moert::SourcePart> out(static_cast<std::size_t>(parts.shape(0)));
            const std::int64_t* q = parts.data();
            for (std::size_t i = 0; i < out.size(); ++i) {
              out[i] = {to_int(q[4 * i], "file"), q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]};
            }
            p.set_source(to_int(layer, "layer"), to_int(expert, "expert"), out);
          },
          py::arg("layer"), py::arg("expert"), py::arg("parts"))
      .def(
          "load",
          [](ExpertPool& p, std::int64_t layer, std::int64_t expert) {
            const int l = to_int(layer, "layer"), e = to_int(expert, "expert");
            py::gil_scoped_release nogil;
            return p.load(l, e);
          },
          py::arg("layer"), py::arg("expert"))
      .def(
          "copy_out",
          [](ExpertPool& p, std::int64_t layer, std::int64_t expert, std::uintptr_t dst) {
            const int l = to_int(layer, "layer"), e = to_int(expert, "expert");
            py::gil_scoped_release nogil;
            p.copy_out(l, e, dst);
          },
          py::arg("layer"), py::arg("expert"), py::arg("dst"))
      .def("resident",
           [](ExpertPool& p, std::int64_t layer) {
             const auto r = p.resident(to_int(layer, "layer"));
             py::array_t<std::uint8_t> out(static_cast<py::ssize_t>(r.size()));
             std::copy(r.begin(), r.end(), out.mutable_data());
             return out;
           })
      .def("stats",
           [](ExpertPool& p) {
             std::vector<moert::PoolStats> rows;
             const moert::PoolStats t = p.stats(&rows);
             py::dict total, layers;
#define MOERT_POOL_FIELD(name) \
  total[#name] = t.name;       \
  layers[#name] = column(rows, &moert::PoolStats::name);
             MOERT_POOL_FIELD(hits)
             MOERT_POOL_FIELD(reads)
             MOERT_POOL_FIELD(read_bytes)
             MOERT_POOL_FIELD(read_s)
             MOERT_POOL_FIELD(demand_reads)
             MOERT_POOL_FIELD(demand_read_s)
             MOERT_POOL_FIELD(evictions)
             MOERT_POOL_FIELD(waits)
             MOERT_POOL_FIELD(ahead_reads)
             MOERT_POOL_FIELD(ahead_used)
             MOERT_POOL_FIELD(ahead_wasted)
             MOERT_POOL_FIELD(ahead_dropped)
             MOERT_POOL_FIELD(ahead_waits)
             MOERT_POOL_FIELD(ahead_wait_s)
#undef MOERT_POOL_FIELD
             return py::make_tuple(total, layers);
           })
      .def(
          "acquire_host",
          [](ExpertPool& p, std::int64_t layer, std::int64_t expert, bool demand) {
            const int l = to_int(layer, "layer"), e = to_int(expert, "expert");
            p.check_entry(l, e);
            py::gil_scoped_release nogil;
            return reinterpret_cast<std::uintptr_t>(p.acquire_host(l, e, demand));
          },
          py::arg("layer"), py::arg("expert"), py::arg("demand") = true,
          "The expert's host slab address, pinned until release_host (what a copy does; tests).")
      .def("release_host",
           [](ExpertPool& p, std::int64_t layer, std::int64_t expert) {
             const int l = to_int(layer, "layer"), e = to_int(expert, "expert");
             p.check_entry(l, e);
             p.release_host(l, e);
           })
      .def(
          "read_ahead",
          [](ExpertPool& p, std::int64_t layer, const Int64Array& experts) {
            const int l = to_int(layer, "layer");
            std::vector<std::int32_t> ids(static_cast<std::size_t>(experts.size()));
            for (std::size_t i = 0; i < ids.size(); ++i) {
              ids[i] = to_int(experts.data()[i], "expert");
            }
            return p.read_ahead(l, ids.data(), static_cast<std::int64_t>(ids.size()));
          },
          py::arg("layer"), py::arg("experts"),
          "Queues background reads of the experts not resident (tiered); returns how many.")
      .def_property("readers", &ExpertPool::readers,
                    [](ExpertPool& p, std::int64_t n) { p.set_readers(to_int(n, "readers")); })
      .def("reset_stats", &ExpertPool::reset_stats)
      .def_property_readonly("num_layers", &ExpertPool::num_layers)
      .def_property_readonly("num_experts", &ExpertPool::num_experts)
      .def_property_readonly("slab_bytes", &ExpertPool::slab_bytes)
      .def_property_readonly("stride", &ExpertPool::stride)
      .def_property_readonly("nbytes", &ExpertPool::nbytes)
      .def_property_readonly("pinned", &ExpertPool::pinned)
      .def_property_readonly("closed", &ExpertPool::closed)
      .def("address",
           [](ExpertPool& p, std::int64_t layer, std::int64_t expert) {
             return p.address(to_int(layer, "layer"), to_int(expert, "expert"));
           })
      .def("base_address",
           [](ExpertPool& p) {
             p.check_open("base_address");
             return p.base_address();
           })
      .def(
          "fill",
          [](ExpertPool& p, std::int64_t layer, std::int64_t expert, std::uintptr_t src,
             std::int64_t nbytes, std::int64_t offset) {
            const int l = to_int(layer, "layer");
            const int e = to_int(expert, "expert");
            py::gil_scoped_release nogil;
            p.fill(l, e, src, nbytes, offset);
          },
          py::arg("layer"), py::arg("expert"), py::arg("src"), py::arg("nbytes"),
          py::arg("offset") = 0)
      .def("close", &ExpertPool::close);

  py::class_<SlabCache, std::shared_ptr<SlabCache>>(m, "SlabCache")
      .def(py::init([](std::shared_ptr<ExpertPool> pool, std::int64_t num_slots,
                       const std::string& policy, const std::string& device, std::int64_t min_slots,
                       double sim_bandwidth_gbs, double sim_latency_us, double sim_jitter_us,
                       std::uint64_t sim_seed) {
             const int slots = to_int(num_slots, "num_slots");
             const int min = to_int(min_slots, "min_slots");
             if (device != "sim") {
               return std::make_shared<SlabCache>(std::move(pool), slots, policy, device, min);
             }
             moert::SimConfig cfg;
             cfg.bandwidth_gbs = sim_bandwidth_gbs;
             cfg.latency_us = sim_latency_us;
             cfg.jitter_us = sim_jitter_us;
             cfg.seed = sim_seed;
             return std::make_shared<SlabCache>(std::move(pool), slots, policy,
                                                std::make_unique<moert::SimBackend>(cfg), min);
           }),
           py::arg("pool"), py::arg("num_slots"), py::arg("policy"), py::arg("device"),
           py::arg("min_slots"), py::arg("sim_bandwidth_gbs") = moert::SimConfig{}.bandwidth_gbs,
           py::arg("sim_latency_us") = moert::SimConfig{}.latency_us,
           py::arg("sim_jitter_us") = 0.0, py::arg("sim_seed") = 0)
      .def_static(
          "simulated",
          [](std::int64_t layers, std::int64_t experts, std::int64_t num_slots,
             const std::string& policy, std::int64_t slab_bytes, std::int64_t min_slots) {
            return std::make_shared<SlabCache>(
                to_int(layers, "num_layers"), to_int(experts, "num_experts"),
                to_int(num_slots, "num_slots"), policy, slab_bytes, to_int(min_slots, "min_slots"));
          },
          py::arg("num_layers"), py::arg("num_experts"), py::arg("num_slots"), py::arg("policy"),
          py::arg("slab_bytes"), py::arg("min_slots"))
      .def_property_readonly("num_layers", &SlabCache::num_layers)
      .def_property_readonly("num_experts", &SlabCache::num_experts)
      .def_property_readonly("num_slots", &SlabCache::num_slots)
      .def_property_readonly("slab_bytes", &SlabCache::slab_bytes)
      .def_property_readonly("stride", &SlabCache::stride)
      .def_property_readonly("policy",
                             [](SlabCache& c) { return SlabCache::policy_name(c.policy()); })
      .def_property_readonly("device", &SlabCache::device)
      .def_property_readonly(
          "device_index",
          [](SlabCache& c) { return c.backend() ? c.backend()->device_index() : -1; })
      .def("sim_device", [](std::shared_ptr<SlabCache> c) { return sim_device_of(c); })
      .def_property_readonly("is_simulated", &SlabCache::simulated)
      .def_property_readonly("closed", &SlabCache::closed)
      .def("lookup",
           [](SlabCache& c, std::int64_t layer, std::int64_t expert) {
             return c.lookup(to_int(layer, "layer"), to_int(expert, "expert"));
           })
      .def(
          "resident",
          [](SlabCache& c, std::int64_t layer, bool in_flight) {
            std::vector<std::uint8_t> r = c.resident(to_int(layer, "layer"), in_flight);
            py::array_t<bool> out(static_cast<py::ssize_t>(r.size()));
            bool* o = out.mutable_data();
            for (std::size_t i = 0; i < r.size(); ++i) o[i] = r[i] != 0;
            return out;
          },
          py::arg("layer"), py::arg("in_flight") = false)
      .def("set_priority",
           [](SlabCache& c, std::int64_t layer, const Int64Array& experts,
              const Float32Array& scores) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             MOERT_CHECK(
                 scores.ndim() == 1 && scores.shape(0) == static_cast<py::ssize_t>(ids.size()),
                 "set_priority: scores must be 1-D with one score per expert (", ids.size(),
                 "), got shape (", scores.ndim() ? scores.shape(0) : 0, ")");
             c.set_priority(to_int(layer, "layer"), ids.data(), scores.data(),
                            static_cast<std::int64_t>(ids.size()));
           })
      .def("slot_address",
           [](SlabCache& c, std::int64_t slot) { return c.slot_address(to_int(slot, "slot")); })
      .def(
          "stats",
          [](SlabCache& c, bool per_layer) {
            if (!per_layer) return cache_stats_dict(c.stats());
            CacheStats total;
            const std::vector<CacheStats> rows = c.layer_stats(&total);
            py::dict d = cache_stats_dict(total);
            d["per_layer"] = cache_layer_dict(rows);
            return d;
          },
          py::arg("per_layer") = false)
      .def("reset_stats", &SlabCache::reset_stats)
      .def("prefetch_seq", &SlabCache::prefetch_seq)
      .def("sim_prefetch",
           [](SlabCache& c, std::int64_t layer, const Int64Array& experts) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             return c.sim_prefetch(to_int(layer, "layer"), ids.data(),
                                   static_cast<std::int64_t>(ids.size()));
           })
      .def("sim_access",
           [](SlabCache& c, std::int64_t layer, const Int64Array& experts) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             return c.sim_access(to_int(layer, "layer"), ids.data(),
                                 static_cast<std::int64_t>(ids.size()));
           })
      .def(
          "replay",
          [](SlabCache& c, const Int32Array& layers, const Int32Array& experts,
             const std::optional<Int32Array>& prefetch,
             const std::optional<Int32Array>& prefetch_layers,
             const std::optional<Float32Array>& priorities,
             const std::optional<Float32Array>& after_scores,
             const std::optional<Int32Array>& after_prefetch, bool waves, bool track_prefetch) {
            MOERT_CHECK(layers.ndim() == 1, "replay: layers must be (N,), got ", layers.ndim(),
                        " dimensions");
            const py::ssize_t n = layers.shape(0);
            MOERT_CHECK(experts.ndim() == 2 && experts.shape(0) == n,
                        "replay: experts must be (N, k) with N=", n);
            moert::ReplayArgs a;
            a.steps = n;
            a.layers = layers.data();
            a.experts = experts.data();
            a.k = experts.shape(1);
            if (prefetch) {
              MOERT_CHECK(prefetch->ndim() == 2 && prefetch->shape(0) == n,
                          "replay: prefetch must be (N, m) with N=", n);
              a.prefetch = prefetch->data();
              a.m = prefetch->shape(1);
            }
            if (prefetch_layers) {
              MOERT_CHECK(prefetch, "replay: prefetch_layers given without prefetch");
              MOERT_CHECK(prefetch_layers->ndim() == 1 && prefetch_layers->shape(0) == n,
                          "replay: prefetch_layers must be (N,) with N=", n);
              a.prefetch_layers = prefetch_layers->data();
            }
            if (priorities) {
              MOERT_CHECK(priorities->ndim() == 2 && priorities->shape(0) == n &&
                              priorities->shape(1) == a.k,
                          "replay: priorities must be (N, k) = (", n, ", ", a.k, ")");
              a.priorities = priorities->data();
            }
            if (after_scores) {
              MOERT_CHECK(after_scores->ndim() == 2 && after_scores->shape(0) == n &&
                              after_scores->shape(1) == c.num_experts(),
                          "replay: after_scores must be (N, E) = (", n, ", ", c.num_experts(), ")");
              a.after_scores = after_scores->data();
            }
            if (after_prefetch) {
              MOERT_CHECK(after_prefetch->ndim() == 2 && after_prefetch->shape(0) == n,
                          "replay: after_prefetch must be (N, a) with N=", n);
              a.after_prefetch = after_prefetch->data();
              a.a = after_prefetch->shape(1);
            }
            a.waves = waves;
            py::array_t<std::int32_t> hits(n);
            a.hits_per_step = hits.mutable_data();
            py::array_t<std::int32_t> queued(track_prefetch ? n : 0);
            py::array_t<std::int32_t> after_queued(track_prefetch ? n : 0);
            py::array_t<std::int64_t> used({track_prefetch ? n : 0, a.k});
            if (track_prefetch) {
              a.prefetch_queued = queued.mutable_data();
              a.prefetch_after_queued = after_queued.mutable_data();
              a.prefetch_used = used.mutable_data();
            }
            const std::int64_t seq0 = c.prefetch_seq();
            CacheStats delta;
            {
              py::gil_scoped_release nogil;
              delta = c.replay(a);
            }
            py::dict d = cache_stats_dict(delta);
            d["hits_per_step"] = hits;
            if (track_prefetch) {
              d["prefetch_seq_start"] = seq0;
              d["prefetch_queued_per_step"] = queued;
              d["prefetch_after_queued_per_step"] = after_queued;
              d["prefetch_used"] = used;
            }
            return d;
          },
          py::arg("layers"), py::arg("experts"), py::arg("prefetch") = py::none(),
          py::arg("prefetch_layers") = py::none(), py::arg("priorities") = py::none(),
          py::arg("after_scores") = py::none(), py::arg("after_prefetch") = py::none(),
          py::arg("waves") = false, py::arg("track_prefetch") = false)
      .def("close", [](SlabCache& c) {
        py::gil_scoped_release nogil;
        c.close();
      });

  py::class_<SimEventRef>(m, "SimEvent")
      .def("record", [](SimEventRef& e, std::uintptr_t stream) { e.event->record(stream); })
      .def("wait",
           [](SimEventRef& e, std::uintptr_t stream) {
             py::gil_scoped_release nogil;  // stream 0 (the host) blocks
             e.event->wait(stream);
           })
      .def("query", [](SimEventRef& e) { return e.event->query(); })
      .def("synchronize",
           [](SimEventRef& e) {
             py::gil_scoped_release nogil;
             e.event->synchronize();
           })
      .def("seconds_since",
           [](SimEventRef& e, SimEventRef& start) { return e.event->seconds_since(*start.event); });

  py::class_<SimDeviceRef>(m, "SimDevice")
      .def_property_readonly("config",
                             [](SimDeviceRef& d) { return sim_config_dict(d.dev->config()); })
      .def("now", [](SimDeviceRef& d) { return d.dev->now(); })
      .def("copy_seconds",
           [](SimDeviceRef& d, std::int64_t nbytes) {
             MOERT_CHECK(nbytes >= 0, "copy_seconds: nbytes must be >= 0, got ", nbytes);
             return d.dev->copy_seconds(static_cast<std::size_t>(nbytes));
           })
      .def("create_stream", [](SimDeviceRef& d) { return d.dev->create_stream(); })
      .def("destroy_stream",
           [](SimDeviceRef& d, std::uintptr_t stream) {
             py::gil_scoped_release nogil;
             d.dev->destroy_stream(stream);
           })
      .def(
          "synchronize",
          [](SimDeviceRef& d, std::optional<std::uintptr_t> stream) {
            py::gil_scoped_release nogil;
            if (stream) {
              d.dev->synchronize_stream(*stream);
            } else {
              d.dev->synchronize();
            }
          },
          py::arg("stream") = py::none())
      .def(
          "create_event",
          [](SimDeviceRef& d, bool timing) {
            return SimEventRef{d.cache,
                               timing ? d.dev->create_timing_event() : d.dev->create_event()};
          },
          py::arg("timing") = false)
      .def("enqueue_read",
           [](SimDeviceRef& d, std::uintptr_t stream, std::uintptr_t address, std::int64_t nbytes,
              double seconds) {
             // kernels read slot memory: anything else would let Python read any address
             const std::uintptr_t base = d.cache->slot_address(0);
             const std::uintptr_t end =
                 base + static_cast<std::uintptr_t>(d.cache->num_slots()) * d.cache->stride();
             MOERT_CHECK(nbytes >= 0 && address >= base &&
                             address + static_cast<std::uintptr_t>(nbytes) <= end,
                         "enqueue_read: [", address, ", +", nbytes,
                         ") is not inside the cache's slot memory [", base, ", ", end, ")");
             py::gil_scoped_release nogil;  // stream 0 (the host) reads now
             return d.dev->enqueue_read(stream, reinterpret_cast<const void*>(address),
                                        static_cast<std::size_t>(nbytes), seconds);
           })
      .def("read_result",
           [](SimDeviceRef& d, std::int64_t ticket) {
             const moert::SimRead r = d.dev->read_result(ticket);
             py::dict out;
             out["done"] = r.done;
             out["start_s"] = r.start_s;
             out["end_s"] = r.end_s;
             out["checksum_start"] = r.checksum_start;
             out["checksum_end"] = r.checksum_end;
             return out;
           })
      .def("enqueue_sleep",
           [](SimDeviceRef& d, std::uintptr_t stream, double seconds) {
             py::gil_scoped_release nogil;
             d.dev->enqueue_sleep(stream, seconds);
           })
      .def("enqueue_copy",
           [](SimDeviceRef& d, std::uintptr_t stream, std::uintptr_t dst, std::uintptr_t src,
              std::int64_t nbytes) {
             MOERT_CHECK(nbytes >= 0, "enqueue_copy: nbytes must be >= 0, got ", nbytes);
             py::gil_scoped_release nogil;
             d.dev->copy_async(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                               static_cast<std::size_t>(nbytes), stream);
           })
      .def_static("checksum", [](std::uintptr_t address, std::int64_t nbytes) {
        MOERT_CHECK(address != 0 && nbytes >= 0, "checksum: bad buffer (address ", address,
                    ", nbytes ", nbytes, ")");
        return moert::SimBackend::checksum(reinterpret_cast<const void*>(address),
                                           static_cast<std::size_t>(nbytes));
      });

  py::class_<CopyEngine, std::shared_ptr<CopyEngine>>(m, "CopyEngine")
      .def(py::init([](std::shared_ptr<SlabCache> cache, std::int64_t num_streams,
                       double slot_timeout_s) {
             MOERT_CHECK(cache != nullptr, "CopyEngine needs a SlabCache, got None");
             MOERT_CHECK(!cache->simulated(),
                         "CopyEngine needs a real cache; a simulated cache loads instantly "
                         "(use sim_access / replay on it)");
             return std::make_shared<CopyEngine>(
                 std::move(cache), to_int(num_streams, "num_streams"), slot_timeout_s);
           }),
           py::arg("cache"), py::arg("num_streams"), py::arg("slot_timeout_s") = 60.0)
      .def_property_readonly("num_streams", &CopyEngine::num_streams)
      .def_property_readonly("closed", &CopyEngine::closed)
      .def_property(
          "read_ahead", &CopyEngine::read_ahead,
          [](CopyEngine& e, std::int64_t k) { e.set_read_ahead(to_int(k, "read_ahead")); })
      .def("prefetch",
           [](CopyEngine& e, std::int64_t layer, const Int64Array& experts) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             const int l = to_int(layer, "layer");
             py::gil_scoped_release nogil;
             return e.prefetch(l, ids.data(), static_cast<std::int64_t>(ids.size()));
           })
      .def("acquire",
           [](CopyEngine& e, std::int64_t layer, const Int64Array& experts, std::uintptr_t stream) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             const int l = to_int(layer, "layer");
             std::vector<std::int32_t> slots;
             {
               py::gil_scoped_release nogil;
               slots = e.acquire(l, ids.data(), static_cast<std::int64_t>(ids.size()), stream);
             }
             return slots;
           })
      .def("acquire_deferred",
           [](CopyEngine& e, std::int64_t layer, const Int64Array& experts, std::uintptr_t stream) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             const int l = to_int(layer, "layer");
             std::vector<std::int32_t> slots;
             std::vector<std::uint8_t> pending;
             {
               py::gil_scoped_release nogil;
               slots = e.acquire(l, ids.data(), static_cast<std::int64_t>(ids.size()), stream,
                                 false, &pending);
             }
             std::vector<bool> flags(pending.begin(), pending.end());
             return py::make_tuple(slots, flags);
           })
      .def("wait_ready",
           [](CopyEngine& e, std::int64_t layer, const Int64Array& experts, std::uintptr_t stream) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             const int l = to_int(layer, "layer");
             py::gil_scoped_release nogil;
             e.wait_ready(l, ids.data(), static_cast<std::int64_t>(ids.size()), stream);
           })
      .def("release",
           [](CopyEngine& e, std::int64_t layer, const Int64Array& experts, std::uintptr_t stream) {
             std::vector<std::int32_t> ids = expert_ids(experts, "experts");
             const int l = to_int(layer, "layer");
             py::gil_scoped_release nogil;
             e.release(l, ids.data(), static_cast<std::int64_t>(ids.size()), stream);
           })
      .def(
          "predict",
          [](CopyEngine& e, const Int64Array& layers, const Int32CastArray& ids,
             std::optional<Float32Array> scores, const Int64Array& clear, float clear_score) {
            std::vector<std::int32_t> ls = expert_ids(layers, "layers");
            std::vector<std::int32_t> cl = expert_ids(clear, "clear");
            const auto n = static_cast<std::int64_t>(ls.size());
            MOERT_CHECK(ids.ndim() == 2 && ids.shape(0) == n, "predict: ids must be (", n,
                        ", width) for ", n, " layers, got ", ids.ndim(), " dimensions");
            const float* sp = nullptr;
            if (scores) {
              const int E = e.cache()->num_experts();
              MOERT_CHECK(scores->ndim() == 2 && scores->shape(0) == n && scores->shape(1) == E,
                          "predict: scores must be (", n, ", ", E, ")");
              sp = scores->data();
            }
            py::gil_scoped_release nogil;
            return e.predict(ls.data(), n, ids.data(), ids.shape(1), sp, cl.data(),
                             static_cast<std::int64_t>(cl.size()), clear_score);
          },
          py::arg("layers"), py::arg("ids"), py::arg("scores"), py::arg("clear"),
          py::arg("clear_score") = 0.0f)
      .def("predict_async",
           [](CopyEngine& e, const Int64Array& layers, std::uintptr_t ids_ptr, std::int64_t width,
              std::uintptr_t scores_ptr, const Int64Array& clear, float clear_score,
              std::uintptr_t stream) {
             std::vector<std::int32_t> ls = expert_ids(layers, "layers");
             std::vector<std::int32_t> cl = expert_ids(clear, "clear");
             py::gil_scoped_release nogil;
             return e.predict_async(ls.data(), static_cast<std::int64_t>(ls.size()),
                                    reinterpret_cast<const std::int32_t*>(ids_ptr), width,
                                    reinterpret_cast<const float*>(scores_ptr), cl.data(),
                                    static_cast<std::int64_t>(cl.size()), clear_score, stream);
           })
      .def("predictions_done", &CopyEngine::predictions_done)
      .def("wait_predictions",
           [](CopyEngine& e, std::uint64_t ticket) {
             py::gil_scoped_release nogil;
             e.wait_predictions(ticket);
           })
      .def("synchronize",
           [](CopyEngine& e) {
             py::gil_scoped_release nogil;
             e.synchronize();
           })
      .def(
          "stats",
          [](CopyEngine& e, bool wait_device, bool per_layer) {
            moert::StatsSnapshot s;
            {
              py::gil_scoped_release nogil;  // with wait_device: waits for the device
              if (per_layer) {
                s = e.snapshot(wait_device);
              } else {
                s.engine = e.stats(wait_device);
              }
            }
            py::dict d = engine_stats_dict(s.engine);
            if (per_layer) {
              d["per_layer"] = engine_layer_dict(s.engine_layers);
              py::dict cache = cache_stats_dict(s.cache);
              cache["per_layer"] = cache_layer_dict(s.cache_layers);
              d["cache"] = cache;
            }
            return d;
          },
          py::arg("wait_device") = false, py::arg("per_layer") = false)
      .def("reset_stats", &CopyEngine::reset_stats)
      .def("close", [](CopyEngine& e) {
        py::gil_scoped_release nogil;
        e.close();
      });

  // The native reuse forecast of policy learned (moert/reuse_forecast.h; Python:
  // moert.predict.reuse_native).
  using moert::ReuseForecaster;
  py::class_<ReuseForecaster>(m, "ReuseForecaster")
      .def(py::init([](int layers, int experts, std::vector<std::int64_t> age_edges,
                       std::vector<double> decays, std::int64_t window, int induction_layers,
                       bool bigram, std::vector<double> match, std::vector<std::int64_t> ahead,
                       std::vector<std::int64_t> horizons, int horizons_used, int density_from,
                       double quantum, double floor_log2, const Float64Array& w1,
                       const Float64Array& c1, const Float64Array& w2, const Float64Array& c2,
                       const Float64Array& bias, const Float64Array& coact_self,
                       const Float64Array& coact_prev, const Float64Array& s_self,
                       const Float64Array& s_prev, int members) {
             moert::ReuseForecastConfig c{layers,
                                          experts,
                                          std::move(age_edges),
                                          std::move(decays),
                                          window,
                                          induction_layers,
                                          bigram,
                                          std::move(match),
                                          std::move(ahead),
                                          std::move(horizons),
                                          horizons_used,
                                          density_from,
                                          quantum,
                                          floor_log2,
                                          members};
             moert::ReuseWeights w{values_of(w1),         values_of(c1),     values_of(w2),
                                   values_of(c2),         values_of(bias),   values_of(coact_self),
                                   values_of(coact_prev), values_of(s_self), values_of(s_prev)};
             return std::make_unique<ReuseForecaster>(std::move(c), std::move(w));
           }),
           py::kw_only(), py::arg("layers"), py::arg("experts"), py::arg("age_edges"),
           py::arg("decays"), py::arg("window"), py::arg("induction_layers"), py::arg("bigram"),
           py::arg("match"), py::arg("ahead"), py::arg("horizons"), py::arg("horizons_used"),
           py::arg("density_from"), py::arg("quantum"), py::arg("floor_log2"), py::arg("w1"),
           py::arg("c1"), py::arg("w2"), py::arg("c2"), py::arg("bias"), py::arg("coact_self"),
           py::arg("coact_prev"), py::arg("s_self"), py::arg("s_prev"), py::arg("members") = 1)
      .def(
          "call",
          [](ReuseForecaster& f, int layer, const ByteArray& used, int value) {
            const int E = f.config().experts;
            MOERT_CHECK(used.ndim() == 1 && used.shape(0) == E,
                        "ReuseForecaster.call: used must be (", E, ",), got ", used.size(),
                        " values in ", used.ndim(), " dimensions");
            MOERT_CHECK(value == 0 || value == 1, "ReuseForecaster.call: value=", value,
                        " must be 0 (density) or 1 (distance)");
            py::array_t<double> out(E);
            f.call(layer, used.data(), static_cast<ReuseForecaster::Value>(value),
                   out.mutable_data());
            return out;
          },
          py::arg("layer"), py::arg("used"), py::arg("value"))
      .def(
          "sequence",
          [](ReuseForecaster& f, const ByteArray& used, int value) {
            const auto& c = f.config();
            MOERT_CHECK(used.ndim() == 3 && used.shape(1) == c.layers && used.shape(2) == c.experts,
                        "ReuseForecaster.sequence: used must be (T, ", c.layers, ", ", c.experts,
                        "), got ", used.ndim(), " dimensions");
            MOERT_CHECK(value == 0 || value == 1, "ReuseForecaster.sequence: value=", value,
                        " must be 0 (density) or 1 (distance)");
            const py::ssize_t T = used.shape(0);
            py::array_t<double> out(
                {T, static_cast<py::ssize_t>(c.layers), static_cast<py::ssize_t>(c.experts)});
            double* o = out.mutable_data();
            const std::uint8_t* u = used.data();
            {
              py::gil_scoped_release nogil;
              f.sequence(T, u, static_cast<ReuseForecaster::Value>(value), o);
            }
            return out;
          },
          py::arg("used"), py::arg("value"))
      .def("features",
           [](ReuseForecaster& f, int layer) {
             py::array_t<double> out({static_cast<py::ssize_t>(f.config().experts),
                                      static_cast<py::ssize_t>(f.num_features())});
             f.features(layer, out.mutable_data());
             return out;
           })
      .def("clock", &ReuseForecaster::clock)
      .def_property_readonly("num_features", &ReuseForecaster::num_features);
}
