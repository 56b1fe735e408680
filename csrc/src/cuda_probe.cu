// CUDA build: cudaGetDeviceCount is the first CUDA call, made only when Python asks.
#include <cuda_runtime.h>

#include "moert/common.h"
#include "moert/cuda_probe.h"

namespace moert {

bool cuda_compiled() { return true; }

CudaProbe cuda_probe() {
  CudaProbe p;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later probes start clean
    p.error_code = static_cast<int>(err);
    p.message = cat("no CUDA device: cudaGetDeviceCount failed with error ", static_cast<int>(err),
                    " (", cudaGetErrorString(err), ")");
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
