// CPU-only build: the CUDA probe reports that the backend was not compiled.
#ifndef MOERT_WITH_CUDA
#include "moert/cuda_probe.h"

namespace moert {

bool cuda_compiled() { return false; }

CudaProbe cuda_probe() {
  CudaProbe p;
  p.message = "no CUDA device: moert was built without the CUDA backend (MOERT_CUDA=OFF)";
  return p;
}

}  // namespace moert
#endif
