// The Python module bquant_kernels._C: build information only. Importing it registers the native ops
// (ops.cpp), which are the one way into the kernels: torch.ops.bquant.native_*.
#include <torch/extension.h>

#include "bquant.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("API_VERSION") = bquant::kApiVersion;
#ifdef BQUANT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
