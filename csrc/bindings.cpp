// pybind11 entry points of t2t_fast._C. No torch headers: tensors arrive as raw pointers and integers.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace {
bool compiled_with_cuda() {
#ifdef T2T_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "t2t_fast native kernels (CPU always; CUDA when built with nvcc)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
}
