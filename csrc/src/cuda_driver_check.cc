// Compiled only where a CUDA toolkit's cuda.h is found (MOERT_CHECK_CUDA_H, set by CMake): the
// constants and handle types cuda_driver.h declares must be cuda.h's. Nothing here runs.
#if defined(MOERT_WITH_CUDA) && defined(MOERT_CHECK_CUDA_H)
#include <type_traits>

// first: cuda.h defines macros (cuMemAlloc -> cuMemAlloc_v2, CU_MEMHOSTREGISTER_PORTABLE) that
// would rename what cuda_driver.h declares
#include "moert/cuda_driver.h"

namespace {
constexpr unsigned kDeclaredPortable = moert::cu::CU_MEMHOSTREGISTER_PORTABLE;
}  // namespace

#include <cuda.h>

namespace moert {
namespace cu {

static_assert(CUDA_SUCCESS == ::CUDA_SUCCESS);
static_assert(CUDA_ERROR_INVALID_VALUE == ::CUDA_ERROR_INVALID_VALUE);
static_assert(CUDA_ERROR_OUT_OF_MEMORY == ::CUDA_ERROR_OUT_OF_MEMORY);
static_assert(CUDA_ERROR_NOT_INITIALIZED == ::CUDA_ERROR_NOT_INITIALIZED);
static_assert(CUDA_ERROR_NO_DEVICE == ::CUDA_ERROR_NO_DEVICE);
static_assert(CUDA_ERROR_INVALID_DEVICE == ::CUDA_ERROR_INVALID_DEVICE);
static_assert(CUDA_ERROR_INVALID_CONTEXT == ::CUDA_ERROR_INVALID_CONTEXT);
static_assert(CUDA_ERROR_INVALID_HANDLE == ::CUDA_ERROR_INVALID_HANDLE);
static_assert(CUDA_ERROR_NOT_READY == ::CUDA_ERROR_NOT_READY);
static_assert(CU_STREAM_NON_BLOCKING == ::CU_STREAM_NON_BLOCKING);
static_assert(CU_EVENT_BLOCKING_SYNC == ::CU_EVENT_BLOCKING_SYNC);
static_assert(CU_EVENT_DISABLE_TIMING == ::CU_EVENT_DISABLE_TIMING);
static_assert(kDeclaredPortable == CU_MEMHOSTREGISTER_PORTABLE);
static_assert(sizeof(CUresult) == sizeof(::CUresult) && sizeof(CUdevice) == sizeof(::CUdevice));
static_assert(std::is_same_v<CUdeviceptr, ::CUdeviceptr>);
static_assert(sizeof(CUstream) == sizeof(::CUstream) && sizeof(CUevent) == sizeof(::CUevent));

}  // namespace cu
}  // namespace moert
#endif
