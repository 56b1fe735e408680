// Whether the CUDA backend was compiled in and whether a device can run. Probing is explicit:
// nothing CUDA happens when the module is loaded (see lazy-init in DeepEP's lazy_driver.hpp).
#pragma once

#include <string>

namespace moert {

bool cuda_compiled();

struct CudaProbe {
  int device_count = 0;  // 0 when no device can run
  int error_code = 0;    // cudaError_t of cudaGetDeviceCount (35: no driver), 0 on success
  std::string message;   // "no CUDA device: ..." or the device name
};

// Calls cudaGetDeviceCount once per call; never throws. Without the CUDA backend it reports that.
CudaProbe cuda_probe();

}  // namespace moert
