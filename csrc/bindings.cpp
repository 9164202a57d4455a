// pybind11 entry points of t2t_fast._C. No torch headers: tensors arrive as raw pointers and integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "restructurize_unfold.h"

namespace py = pybind11;

namespace {
bool compiled_with_cuda() {
#ifdef T2T_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::string> compiled_kernels() {
  std::vector<std::string> names = {"restructurize_unfold_cpu"};
#ifdef T2T_WITH_CUDA
  names.push_back("restructurize_unfold_cuda");
#endif
  return names;
}

using Quad = std::array<int64_t, 4>;
using Pair = std::array<int64_t, 2>;

// sizes (B, C, H, W), window (kh, kw), (sh, sw), (ph, pw), element strides of the unfold input as (B, C, H, W).
// The Python wrapper validates first; these checks only keep a bad direct call from touching memory.
t2t::UnfoldGeometry make_geometry(const Quad& sizes, const Pair& kernel, const Pair& stride, const Pair& padding,
                                  const Quad& strides) {
  t2t::UnfoldGeometry g{sizes[0],  sizes[1],  sizes[2],  sizes[3],   kernel[0],  kernel[1],  stride[0],  stride[1],
                        padding[0], padding[1], 0,        0,          strides[0], strides[1], strides[2], strides[3]};
  for (int64_t v : sizes) {
    if (v <= 0) throw py::value_error("restructurize_unfold: sizes must be positive");
  }
  for (int i = 0; i < 2; ++i) {
    if (kernel[i] <= 0 || stride[i] <= 0 || padding[i] < 0) {
      throw py::value_error("restructurize_unfold: kernel and stride must be positive, padding non-negative");
    }
  }
  for (int64_t v : strides) {
    if (v < 0) throw py::value_error("restructurize_unfold: strides must be non-negative");
  }
  if (g.height + 2 * g.pad_h < g.kernel_h || g.width + 2 * g.pad_w < g.kernel_w) {
    throw py::value_error("restructurize_unfold: the window does not fit the padded input");
  }
  g.out_h = t2t::unfold_out_size(g.height, g.kernel_h, g.stride_h, g.pad_h);
  g.out_w = t2t::unfold_out_size(g.width, g.kernel_w, g.stride_w, g.pad_w);
  return g;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "t2t_fast native kernels (CPU always; CUDA when built with nvcc)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("compiled_kernels", &compiled_kernels, "Names of the kernels compiled into this build");

  m.def(
      "restructurize_unfold_forward_cpu",
      [](std::uintptr_t x, std::uintptr_t y, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, int dtype, int threads) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        py::gil_scoped_release release;
        t2t::restructurize_unfold_forward_cpu(x, y, g, dtype, threads < 1 ? 1 : threads);
      },
      py::arg("x"), py::arg("y"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("dtype"), py::arg("threads"),
      "y (B, L, C*kh*kw) contiguous <- x viewed as (B, C, H, W) through `strides`; pointers as integers");
  m.def(
      "restructurize_unfold_backward_cpu",
      [](std::uintptr_t dy, std::uintptr_t dx, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, int dtype, int threads) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        py::gil_scoped_release release;
        t2t::restructurize_unfold_backward_cpu(dy, dx, g, dtype, threads < 1 ? 1 : threads);
      },
      py::arg("dy"), py::arg("dx"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("dtype"), py::arg("threads"),
      "dx (written through `strides`) <- dy (B, L, C*kh*kw) contiguous, by gathering (no atomics)");
  m.def(
      "restructurize_unfold_forward_emulated",
      [](std::uintptr_t x, std::uintptr_t y, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, int dtype, int index_bits) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        py::gil_scoped_release release;
        t2t::restructurize_unfold_forward_emulated(x, y, g, dtype, index_bits);
      },
      py::arg("x"), py::arg("y"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("dtype"), py::arg("index_bits") = 0,
      "The CUDA forward kernel's threads run serially on CPU memory (tests of the CUDA indexing)");
  m.def(
      "restructurize_unfold_backward_emulated",
      [](std::uintptr_t dy, std::uintptr_t dx, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, bool channels_last, int dtype, int index_bits) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        py::gil_scoped_release release;
        t2t::restructurize_unfold_backward_emulated(dy, dx, g, channels_last, dtype, index_bits);
      },
      py::arg("dy"), py::arg("dx"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("channels_last"), py::arg("dtype"), py::arg("index_bits") = 0,
      "The CUDA backward kernels' threads run serially on CPU memory (tests of the CUDA indexing)");
#ifdef T2T_WITH_CUDA
  m.def(
      "restructurize_unfold_forward_cuda",
      [](std::uintptr_t x, std::uintptr_t y, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, int dtype, int device, std::uintptr_t stream) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        t2t::restructurize_unfold_forward_cuda(x, y, g, dtype, device, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "CUDA forward on `stream` (a cudaStream_t as an integer); raises RuntimeError on a CUDA error");
  m.def(
      "restructurize_unfold_backward_cuda",
      [](std::uintptr_t dy, std::uintptr_t dx, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, bool channels_last, int dtype, int device, std::uintptr_t stream) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        t2t::restructurize_unfold_backward_cuda(dy, dx, g, channels_last, dtype, device, stream);
      },
      py::arg("dy"), py::arg("dx"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "CUDA backward on `stream`; raises RuntimeError on a CUDA error");
#endif
}
