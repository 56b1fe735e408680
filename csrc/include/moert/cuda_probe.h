// Whether the CUDA backend was compiled in and whether a device can run. Probing is explicit:
// nothing CUDA happens when the module is loaded (the driver library is dlopen'ed by the first
// probe; see cuda_driver.h).
#pragma once

#include <string>

namespace moert {

bool cuda_compiled();

struct CudaProbe {
  int device_count = 0;    // 0 when no device can run
  int error_code = 0;      // CUresult of the failing driver call; -1: no usable driver library
  int driver_version = 0;  // cuDriverGetVersion (13000 = CUDA 13.0); 0 when none was loaded
  std::string library;     // the driver library loaded ($MOERT_LIBCUDA or libcuda.so.1)
  std::string message;     // "no CUDA device: ..." or the name of device 0
};

// Loads the driver (once per library path) and counts its devices; never throws. Without the
// CUDA backend it reports that.
CudaProbe cuda_probe();

}  // namespace moert
