// Loading the CUDA driver API at run time (see cuda_driver.h).
#ifdef MOERT_WITH_CUDA
#include "moert/cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "moert/common.h"

namespace moert {
namespace cu {

std::string cuda_version_text(int version) {
  return cat(version / 1000, ".", (version % 1000) / 10);
}

std::string cuda_error_text(const Driver& d, CUresult err, const char* call) {
  const char* text = nullptr;
  if (d.cuGetErrorString == nullptr || d.cuGetErrorString(err, &text) != CUDA_SUCCESS ||
      text == nullptr) {
    text = "unknown error";
  }
  return cat(call, ": ", text, " (", err, ")");
}

namespace {

// Resolves `name` (then `fallback`, when given) into `fn`; false when neither is exported.
template <typename Fn>
bool resolve(void* handle, Fn& fn, const char* name, const char* fallback = nullptr) {
  void* p = dlsym(handle, name);
  if (p == nullptr && fallback != nullptr) p = dlsym(handle, fallback);
  fn = reinterpret_cast<Fn>(p);
  return p != nullptr;
}

// The entry points after the version check; the name of the first one missing, or "".
std::string resolve_all(void* h, Driver& d) {
#define MOERT_RESOLVE(field, ...) \
  if (!resolve(h, d.field, __VA_ARGS__)) return #field;
  MOERT_RESOLVE(cuInit, "cuInit")
  MOERT_RESOLVE(cuDeviceGetCount, "cuDeviceGetCount")
  MOERT_RESOLVE(cuDeviceGet, "cuDeviceGet")
  MOERT_RESOLVE(cuDeviceGetName, "cuDeviceGetName")
  MOERT_RESOLVE(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
  MOERT_RESOLVE(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2")
  MOERT_RESOLVE(cuCtxGetCurrent, "cuCtxGetCurrent")
  MOERT_RESOLVE(cuCtxSetCurrent, "cuCtxSetCurrent")
  MOERT_RESOLVE(cuCtxGetDevice, "cuCtxGetDevice")
  MOERT_RESOLVE(cuMemAlloc, "cuMemAlloc_v2")
  MOERT_RESOLVE(cuMemFree, "cuMemFree_v2")
  MOERT_RESOLVE(cuMemHostRegister, "cuMemHostRegister_v2")
  MOERT_RESOLVE(cuMemHostUnregister, "cuMemHostUnregister")
  MOERT_RESOLVE(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2")
  MOERT_RESOLVE(cuMemsetD8Async, "cuMemsetD8Async")
  MOERT_RESOLVE(cuStreamCreate, "cuStreamCreate")
  MOERT_RESOLVE(cuStreamDestroy, "cuStreamDestroy_v2")
  MOERT_RESOLVE(cuStreamSynchronize, "cuStreamSynchronize")
  MOERT_RESOLVE(cuStreamWaitEvent, "cuStreamWaitEvent")
  MOERT_RESOLVE(cuEventCreate, "cuEventCreate")
  MOERT_RESOLVE(cuEventDestroy, "cuEventDestroy_v2")
  MOERT_RESOLVE(cuEventRecord, "cuEventRecord")
  MOERT_RESOLVE(cuEventQuery, "cuEventQuery")
  MOERT_RESOLVE(cuEventSynchronize, "cuEventSynchronize")
  MOERT_RESOLVE(cuEventElapsedTime, "cuEventElapsedTime_v2", "cuEventElapsedTime")
#undef MOERT_RESOLVE
  return "";
}

// True when the driver is new enough (asked on every load: the version is the driver's answer).
bool version_ok(Driver& d, std::string* error) {
  const CUresult err = d.cuDriverGetVersion(&d.version);
  if (err == CUDA_SUCCESS && d.version >= kMinDriverVersion) return true;
  if (err != CUDA_SUCCESS) d.version = 0;
  *error = cat("no CUDA device: the CUDA driver is too old: '", d.library, "' supports CUDA ",
               cuda_version_text(d.version), " (cuDriverGetVersion ", d.version,
               ") but moert's CUDA backend needs CUDA ", cuda_version_text(kMinDriverVersion),
               " or later; install a newer NVIDIA driver");
  return false;
}

// dlopen + version check + every entry point; nullptr with `error` set.
std::unique_ptr<Driver> open_driver(const std::string& path, std::string* error) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* why = dlerror();
    *error = cat("no CUDA device: the CUDA driver library '", path, "' could not be loaded (",
                 why ? why : "dlopen failed",
                 "); install the NVIDIA driver, or set MOERT_LIBCUDA to the path of libcuda.so");
    return nullptr;
  }
  auto d = std::make_unique<Driver>();
  d->library = path;
  if (!resolve(h, d->cuDriverGetVersion, "cuDriverGetVersion") ||
      !resolve(h, d->cuGetErrorString, "cuGetErrorString")) {
    *error =
        cat("no CUDA device: '", path, "' is not a CUDA driver library (no cuDriverGetVersion)");
    dlclose(h);
    return nullptr;
  }
  if (!version_ok(*d, error)) {
    dlclose(h);
    return nullptr;
  }
  const std::string missing = resolve_all(h, *d);
  if (!missing.empty()) {
    *error =
        cat("no CUDA device: the CUDA driver '", path, "' (CUDA ", cuda_version_text(d->version),
            ") does not export ", missing, "; install a newer NVIDIA driver");
    dlclose(h);
    return nullptr;
  }
  return d;  // the handle stays open for the life of the process
}

}  // namespace

const Driver* load_cuda_driver(std::string* error) {
  static std::mutex mu;
  static auto* loaded = new std::map<std::string, Driver*>();  // never freed: used at exit
  const char* env = std::getenv("MOERT_LIBCUDA");
  const std::string path = env != nullptr && env[0] != '\0' ? env : "libcuda.so.1";
  std::lock_guard<std::mutex> lock(mu);
  Driver* d = nullptr;
  auto it = loaded->find(path);
  if (it != loaded->end()) {
    d = it->second;
    if (!version_ok(*d, error)) return nullptr;
  } else {
    std::unique_ptr<Driver> fresh = open_driver(path, error);
    if (!fresh) return nullptr;
    d = fresh.release();
    (*loaded)[path] = d;
  }
  // cuInit until it succeeds once (a failure, e.g. no device, is not remembered)
  const CUresult err = d->cuInit(0);
  if (err != CUDA_SUCCESS) {
    *error = cat("no CUDA device: ", cuda_error_text(*d, err, "cuInit"), " (driver '", path,
                 "', CUDA ", cuda_version_text(d->version), ")");
    return nullptr;
  }
  return d;
}

}  // namespace cu
}  // namespace moert
#endif  // MOERT_WITH_CUDA
