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

// The Python entry point of fn(a, b, geometry, extra...): (a, b, sizes, kernel, stride, padding, strides,
// extra...), with the geometry checked before any memory is touched. CPU work runs without the GIL.
template <bool ReleaseGil, typename... Extra>
auto with_geometry(void (*fn)(std::uintptr_t, std::uintptr_t, const t2t::UnfoldGeometry&, Extra...)) {
  return [fn](std::uintptr_t a, std::uintptr_t b, const Quad& sizes, const Pair& kernel, const Pair& stride,
              const Pair& padding, const Quad& strides, Extra... extra) {
    const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
    if constexpr (ReleaseGil) {
      py::gil_scoped_release release;
      fn(a, b, g, extra...);
    } else {
      fn(a, b, g, extra...);
    }
  };
}

// m.def of such an entry point: buffer names `a` and `b`, the geometry's arguments, then `extra` py::args.
template <bool ReleaseGil, typename Fn, typename... ExtraArgs>
void def_with_geometry(py::module_& m, const char* name, Fn* fn, const char* a, const char* b, const char* doc,
                       ExtraArgs... extra) {
  m.def(name, with_geometry<ReleaseGil>(fn), py::arg(a), py::arg(b), py::arg("sizes"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("strides"), extra..., doc);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "t2t_fast native kernels (CPU always; CUDA when built with nvcc)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("compiled_kernels", &compiled_kernels, "Names of the kernels compiled into this build");

  def_with_geometry<true>(
      m, "restructurize_unfold_forward_cpu", &t2t::restructurize_unfold_forward_cpu, "x", "y",
      "y (B, L, C*kh*kw) contiguous <- x viewed as (B, C, H, W) through `strides`; pointers as integers",
      py::arg("dtype"), py::arg("threads"));
  def_with_geometry<true>(
      m, "restructurize_unfold_backward_cpu", &t2t::restructurize_unfold_backward_cpu, "dy", "dx",
      "dx (written through `strides`) <- dy (B, L, C*kh*kw) contiguous, by gathering (no atomics)",
      py::arg("dtype"), py::arg("threads"));
  def_with_geometry<true>(
      m, "restructurize_unfold_forward_emulated", &t2t::restructurize_unfold_forward_emulated, "x", "y",
      "The CUDA forward kernel's threads run serially on CPU memory (tests of the CUDA indexing)",
      py::arg("dtype"), py::arg("index_bits") = 0);
  def_with_geometry<true>(
      m, "restructurize_unfold_backward_emulated", &t2t::restructurize_unfold_backward_emulated, "dy", "dx",
      "The CUDA backward kernels' threads run serially on CPU memory (tests of the CUDA indexing)",
      py::arg("channels_last"), py::arg("dtype"), py::arg("index_bits") = 0);
#ifdef T2T_WITH_CUDA
  def_with_geometry<false>(
      m, "restructurize_unfold_forward_cuda", &t2t::restructurize_unfold_forward_cuda, "x", "y",
      "CUDA forward on `stream` (a cudaStream_t as an integer); raises RuntimeError on a CUDA error",
      py::arg("dtype"), py::arg("device"), py::arg("stream"));
  def_with_geometry<false>(
      m, "restructurize_unfold_backward_cuda", &t2t::restructurize_unfold_backward_cuda, "dy", "dx",
      "CUDA backward on `stream`; raises RuntimeError on a CUDA error",
      py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
#endif
}
