// The CUDA driver API, loaded at run time: dlopen("libcuda.so.1") (or $MOERT_LIBCUDA) and dlsym
// of the few entry points the CUDA backend uses. No CUDA toolkit is needed to build it and nothing
// links libcudart, so one build works with every driver new enough for the calls below
// (kMinDriverVersion), whatever CUDA the installed torch was built with.
//
// The types and constants are declared here (the values of cuda.h, CUDA 11-13, checked against the
// toolkit's cuda.h by cuda_driver_check.cc when a toolkit is present). Nothing is loaded until
// load_cuda_driver() is called: importing moert never touches libcuda.
#pragma once

#include <cstddef>
#include <string>

namespace moert {
namespace cu {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
struct CUctx_st;
struct CUstream_st;
struct CUevent_st;
using CUcontext = CUctx_st*;
using CUstream = CUstream_st*;  // the same handle as the runtime's cudaStream_t (torch's streams)
using CUevent = CUevent_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr CUresult CUDA_ERROR_NO_DEVICE = 100;
constexpr CUresult CUDA_ERROR_INVALID_DEVICE = 101;
constexpr CUresult CUDA_ERROR_INVALID_CONTEXT = 201;
constexpr CUresult CUDA_ERROR_INVALID_HANDLE = 400;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned CU_EVENT_BLOCKING_SYNC = 0x1;
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x1;

// The oldest driver the backend accepts (cuDriverGetVersion's 1000 * major + 10 * minor): the
// newest entry point used (cuDevicePrimaryCtxRelease_v2) exists from CUDA 11.0 on.
constexpr int kMinDriverVersion = 11000;

// The entry points, by the exported names of their current ABI (_v2 where cuda.h maps to one; the
// legacy default-stream variants, as torch's streams use: no _ptsz).
struct Driver {
  std::string library;  // the path given to dlopen
  int version = 0;      // cuDriverGetVersion
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDriverGetVersion)(int*) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
  CUresult (*cuDeviceGetCount)(int*) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetName)(char*, int, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice) = nullptr;  // _v2
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*cuCtxGetDevice)(CUdevice*) = nullptr;
  CUresult (*cuMemAlloc)(CUdeviceptr*, std::size_t) = nullptr;            // _v2
  CUresult (*cuMemFree)(CUdeviceptr) = nullptr;                           // _v2
  CUresult (*cuMemHostRegister)(void*, std::size_t, unsigned) = nullptr;  // _v2
  CUresult (*cuMemHostUnregister)(void*) = nullptr;
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, std::size_t, CUstream) = nullptr;  // _v2
  CUresult (*cuMemsetD8Async)(CUdeviceptr, unsigned char, std::size_t, CUstream) = nullptr;
  CUresult (*cuStreamCreate)(CUstream*, unsigned) = nullptr;
  CUresult (*cuStreamDestroy)(CUstream) = nullptr;  // _v2
  CUresult (*cuStreamSynchronize)(CUstream) = nullptr;
  CUresult (*cuStreamWaitEvent)(CUstream, CUevent, unsigned) = nullptr;
  CUresult (*cuEventCreate)(CUevent*, unsigned) = nullptr;
  CUresult (*cuEventDestroy)(CUevent) = nullptr;  // _v2
  CUresult (*cuEventRecord)(CUevent, CUstream) = nullptr;
  CUresult (*cuEventQuery)(CUevent) = nullptr;
  CUresult (*cuEventSynchronize)(CUevent) = nullptr;
  CUresult (*cuEventElapsedTime)(float*, CUevent, CUevent) = nullptr;  // _v2 when exported
};

// The driver named by $MOERT_LIBCUDA (default "libcuda.so.1"), loaded, checked and cuInit'ed once
// per path and kept for the life of the process. nullptr with `*error` set ("no CUDA device: ...",
// naming the library and, for a driver too old, the version found and kMinDriverVersion) when it
// cannot be used; a failure is not remembered (a later call tries again).
const Driver* load_cuda_driver(std::string* error);

// "13.0" for 13000.
std::string cuda_version_text(int version);

// "<call>: <cuGetErrorString> (<code>)".
std::string cuda_error_text(const Driver& d, CUresult err, const char* call);

}  // namespace cu
}  // namespace moert
