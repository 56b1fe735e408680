// CUDA build: the probe loads the driver API (cuda_driver.h) only when Python asks.
#ifdef MOERT_WITH_CUDA
#include "moert/cuda_probe.h"

#include "moert/common.h"
#include "moert/cuda_driver.h"

namespace moert {

bool cuda_compiled() { return true; }

CudaProbe cuda_probe() {
  using namespace cu;  // NOLINT
  CudaProbe p;
  std::string error;
  const Driver* d = load_cuda_driver(&error);
  if (d == nullptr) {
    p.error_code = -1;
    p.message = error;
    return p;
  }
  p.driver_version = d->version;
  p.library = d->library;
  int n = 0;
  const CUresult err = d->cuDeviceGetCount(&n);
  if (err != CUDA_SUCCESS) {
    p.error_code = err;
    p.message = cat("no CUDA device: ", cuda_error_text(*d, err, "cuDeviceGetCount"));
    return p;
  }
  p.device_count = n;
  if (n == 0) {
    p.message = "no CUDA device: the driver reports 0 devices";
    return p;
  }
  char name[256] = {};
  CUdevice dev = 0;
  if (d->cuDeviceGet(&dev, 0) == CUDA_SUCCESS &&
      d->cuDeviceGetName(name, sizeof name - 1, dev) == CUDA_SUCCESS) {
    p.message = name;
  }
  return p;
}

}  // namespace moert
#endif  // MOERT_WITH_CUDA
