// The only file in csrc/ that knows Python. Maps moert::ArgumentError to ValueError and
// moert::RuntimeFailure to RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "moert/common.h"
#include "moert/cuda_probe.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
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
        return d;
      },
      "Ask the CUDA runtime for devices (the first CUDA call; never raises).");
}
