// Thin Python binding of the kernels (flash-attn style): no logic here.
#include <torch/extension.h>

#include "bquant.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("API_VERSION") = 3;  // bquant_kernels/_ext.py checks this
#ifdef BQUANT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("cpu_batch_range", &bquant::cpu_batch_range);
  m.def("cpu_batchquant_forward", &bquant::cpu_batchquant_forward);
  m.def("cpu_batchquant_backward", &bquant::cpu_batchquant_backward);
  m.def("cpu_lsq_forward", &bquant::cpu_lsq_forward);
  m.def("cpu_lsq_backward", &bquant::cpu_lsq_backward);
#ifdef BQUANT_WITH_CUDA
  m.def("cuda_batch_range", &bquant::cuda_batch_range);
  m.def("cuda_batchquant_forward", &bquant::cuda_batchquant_forward);
  m.def("cuda_batchquant_backward", &bquant::cuda_batchquant_backward);
  m.def("cuda_lsq_forward", &bquant::cuda_lsq_forward);
  m.def("cuda_lsq_backward", &bquant::cuda_lsq_backward);
  m.def("cuda_lsq_multi_forward", &bquant::cuda_lsq_multi_forward);
  m.def("cuda_lsq_multi_backward", &bquant::cuda_lsq_multi_backward);
#endif
}
