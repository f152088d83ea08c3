// A stand-in for the CUDA driver (libcuda.so.1) on a machine without a GPU, for
// pallas_kernels/ptxas_report.py: Mosaic GPU's compiler (MosaicGpuCompile in JAX's CUDA
// plugin) asks the driver only for the current device's compute capability before it emits
// PTX and runs ptxas; it then loads the binary, which this driver refuses. Built by
// scripts/get_sm90_toolchain.sh:
//   cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o libcuda.so.1 scripts/fake_libcuda.c
// FAKE_CUDA_CC="MAJOR.MINOR" picks the compute capability reported (9.0, Hopper, by default).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;

enum { CUDA_SUCCESS = 0, CUDA_ERROR_NO_DEVICE = 100 };
enum { ATTR_CC_MAJOR = 75, ATTR_CC_MINOR = 76 };

static void compute_capability(int *major, int *minor) {
  const char *cc = getenv("FAKE_CUDA_CC");
  *major = 9;
  *minor = 0;
  if (cc != NULL && sscanf(cc, "%d.%d", major, minor) != 2) {
    *major = 9;
    *minor = 0;
  }
}

CUresult cuInit(unsigned flags) { return CUDA_SUCCESS; }

CUresult cuDriverGetVersion(int *version) {
  *version = 12090;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
  *count = 1;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice *device) {
  *device = 0;
  return CUDA_SUCCESS;
}

static int the_context;

CUresult cuCtxGetCurrent(CUcontext *context) {
  *context = &the_context;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  int major, minor;
  compute_capability(&major, &minor);
  *value = attribute == ATTR_CC_MAJOR ? major : attribute == ATTR_CC_MINOR ? minor : 0;
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = error == CUDA_ERROR_NO_DEVICE ? "no CUDA device (fake_libcuda: compile only)"
                                        : "fake_libcuda: unsupported call";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
  *name = error == CUDA_ERROR_NO_DEVICE ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN";
  return CUDA_SUCCESS;
}

// Loading a compiled module needs a device: refused, after the compiler has written its dumps.
CUresult cuModuleLoadData(void **module, const void *image) { return CUDA_ERROR_NO_DEVICE; }

CUresult cuModuleLoadDataEx(void **module, const void *image, unsigned num_options,
                            void *options, void **values) {
  return CUDA_ERROR_NO_DEVICE;
}
