// CUDA build: cudaGetDeviceCount is the first CUDA call, made only when Python asks.
#include <cuda_runtime.h>

#include "moert/common.h"
#include "moert/cuda_probe.h"

namespace moert {

bool cuda_compiled() { return true; }

namespace {
std::string version_text(int v) { return cat(v / 1000, ".", (v % 1000) / 10); }
}  // namespace

CudaProbe cuda_probe() {
  CudaProbe p;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later probes start clean
    p.error_code = static_cast<int>(err);
    p.message = cat("no CUDA device: cudaGetDeviceCount failed with error ", static_cast<int>(err),
                    " (", cudaGetErrorString(err), ")");
    // Error 35 means no driver or one older than this runtime: say which, with both versions.
    int driver = 0;
    int runtime = 0;
    if (cudaDriverGetVersion(&driver) == cudaSuccess &&
        cudaRuntimeGetVersion(&runtime) == cudaSuccess) {
      if (driver == 0) {
        p.message += cat("; no CUDA driver is installed (moert's CUDA runtime is ",
                         version_text(runtime), ")");
      } else if (driver < runtime) {
        p.message =
            cat("no CUDA device: the CUDA driver is too old: it supports CUDA ",
                version_text(driver), " but moert was built with the CUDA ", version_text(runtime),
                " runtime; install a driver for CUDA ", version_text(runtime),
                " or later, or build moert with a CUDA toolkit ", "no newer than ",
                version_text(driver), " (error ", static_cast<int>(err), ")");
      }
    }
    cudaGetLastError();
    return p;
  }
  p.device_count = n;
  if (n == 0) {
    p.message = "no CUDA device: the driver reports 0 devices";
    return p;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) p.message = prop.name;
  return p;
}

}  // namespace moert
