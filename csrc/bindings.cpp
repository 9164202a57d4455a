// pybind11 entry points of t2t_fast._C. No torch headers: tensors arrive as addresses and integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
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

// a*b, a+b of non-negative values; a ValueError when the result would not fit int64_t.
int64_t checked_mul(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_mul_overflow(a, b, &out)) throw py::value_error("restructurize_unfold: sizes overflow int64");
  return out;
}

int64_t checked_add(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_add_overflow(a, b, &out)) throw py::value_error("restructurize_unfold: sizes overflow int64");
  return out;
}

// sizes (B, C, H, W), window (kh, kw), (sh, sw), (ph, pw), element strides of the strided buffer as (B, C, H, W).
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
  if (checked_add(g.height, checked_mul(2, g.pad_h)) < g.kernel_h ||
      checked_add(g.width, checked_mul(2, g.pad_w)) < g.kernel_w) {
    throw py::value_error("restructurize_unfold: the window does not fit the padded input");
  }
  g.out_h = t2t::unfold_out_size(g.height, g.kernel_h, g.stride_h, g.pad_h);
  g.out_w = t2t::unfold_out_size(g.width, g.kernel_w, g.stride_w, g.pad_w);
  return g;
}

// Elements of the (B, L, C*kh*kw) buffer: y of the forward, dy of the backward.
int64_t unfolded_elems(const t2t::UnfoldGeometry& g) {
  const int64_t rows = checked_mul(checked_mul(g.batch, g.out_h), g.out_w);
  return checked_mul(rows, checked_mul(g.channels, checked_mul(g.kernel_h, g.kernel_w)));
}

// One past the largest element offset of the strided buffer (x of the forward, dx of the backward): the
// kernels read or write no element outside [0, reach) (padding taps touch no memory).
int64_t strided_reach(const t2t::UnfoldGeometry& g) {
  const Quad sizes = {g.batch, g.channels, g.height, g.width};
  const Quad strides = {g.stride_b, g.stride_c, g.stride_y, g.stride_x};
  int64_t last = 0;
  for (int i = 0; i < 4; ++i) last = checked_add(last, checked_mul(sizes[i] - 1, strides[i]));
  return checked_add(last, 1);
}

// The backward writes dx from several threads: no two (b, c, y, x) may share an element. Sorted by stride,
// each axis of more than one element must step past everything the smaller axes reach.
void check_no_overlap(const t2t::UnfoldGeometry& g) {
  std::array<Pair, 4> axes = {Pair{g.stride_b, g.batch}, Pair{g.stride_c, g.channels}, Pair{g.stride_y, g.height},
                              Pair{g.stride_x, g.width}};
  std::sort(axes.begin(), axes.end());
  int64_t reach = 0;  // largest offset of the axes so far
  for (const Pair& axis : axes) {
    if (axis[1] == 1) continue;
    if (axis[0] <= reach) throw py::value_error("restructurize_unfold: the strides of dx overlap");
    reach = checked_add(reach, checked_mul(axis[0], axis[1] - 1));
  }
}

int64_t element_size(int dtype) {
  int64_t size = 0;
  t2t::dispatch_dtype(dtype, [&](auto d) { size = sizeof(t2t::StorageBits<decltype(d)::value>); });
  return size;
}

// A buffer of `extent` elements at `address` must hold the `needed` elements the geometry reaches, at an
// address aligned to the element size.
void check_buffer(const char* name, std::uintptr_t address, int64_t extent, int64_t needed, int64_t elem) {
  if (extent < needed) {
    throw py::value_error(std::string("restructurize_unfold: ") + name + " holds " + std::to_string(extent) +
                          " elements but the geometry reaches " + std::to_string(needed));
  }
  if (address == 0 || address % elem != 0) {
    throw py::value_error(std::string("restructurize_unfold: ") + name + " is null or not aligned to its " +
                          std::to_string(elem) + "-byte elements");
  }
}

enum class Direction { kForward, kBackward };

// The Python entry point of fn(a, b, geometry, dtype, extra...): (a, a_extent, b, b_extent, sizes, kernel, stride,
// padding, strides, dtype, extra...). The extents are the elements each buffer holds from its address (a
// tensor's storage past its offset); the geometry is checked against them, and against itself, before fn runs.
// Only the addresses are taken on trust. CPU work runs without the GIL.
template <Direction Dir, bool ReleaseGil, typename... Extra>
auto checked(void (*fn)(std::uintptr_t, std::uintptr_t, const t2t::UnfoldGeometry&, int, Extra...)) {
  return [fn](std::uintptr_t a, int64_t a_extent, std::uintptr_t b, int64_t b_extent, const Quad& sizes,
              const Pair& kernel, const Pair& stride, const Pair& padding, const Quad& strides, int dtype,
              Extra... extra) {
    const int64_t elem = element_size(dtype);
    const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
    const int64_t unfolded = unfolded_elems(g);
    const int64_t reach = strided_reach(g);
    if (Dir == Direction::kForward) {
      check_buffer("x", a, a_extent, reach, elem);
      check_buffer("y", b, b_extent, unfolded, elem);
    } else {
      check_buffer("dy", a, a_extent, unfolded, elem);
      check_buffer("dx", b, b_extent, reach, elem);
      check_no_overlap(g);
    }
    if constexpr (ReleaseGil) {
      py::gil_scoped_release release;
      fn(a, b, g, dtype, extra...);
    } else {
      fn(a, b, g, dtype, extra...);
    }
  };
}

// m.def of such an entry point: the names of a, a_extent, b, b_extent, the geometry's arguments, dtype, then
// `extra` py::args.
template <Direction Dir, bool ReleaseGil, typename Fn, typename... ExtraArgs>
void def_checked(py::module_& m, const char* name, Fn* fn, const std::array<const char*, 4>& buffers,
                 const char* doc, ExtraArgs... extra) {
  m.def(name, checked<Dir, ReleaseGil>(fn), py::arg(buffers[0]), py::arg(buffers[1]), py::arg(buffers[2]),
        py::arg(buffers[3]), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
        py::arg("strides"), py::arg("dtype"), extra..., doc);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "t2t_fast native kernels (CPU always; CUDA when built with nvcc)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("compiled_kernels", &compiled_kernels, "Names of the kernels compiled into this build");

  constexpr auto kForward = Direction::kForward;
  constexpr auto kBackward = Direction::kBackward;
  const std::array<const char*, 4> kForwardBuffers = {"x", "x_extent", "y", "y_extent"};
  const std::array<const char*, 4> kBackwardBuffers = {"dy", "dy_extent", "dx", "dx_extent"};
  def_checked<kForward, true>(
      m, "restructurize_unfold_forward_cpu", &t2t::restructurize_unfold_forward_cpu, kForwardBuffers,
      "y (B, L, C*kh*kw) contiguous <- x viewed as (B, C, H, W) through `strides`; addresses as integers, each "
      "with the elements its buffer holds from there",
      py::arg("threads"));
  def_checked<kBackward, true>(
      m, "restructurize_unfold_backward_cpu", &t2t::restructurize_unfold_backward_cpu, kBackwardBuffers,
      "dx (written through `strides`) <- dy (B, L, C*kh*kw) contiguous, by gathering (no atomics)",
      py::arg("threads"));
  def_checked<kForward, true>(
      m, "restructurize_unfold_forward_emulated", &t2t::restructurize_unfold_forward_emulated, kForwardBuffers,
      "The CUDA forward kernels run serially on CPU memory (tests of the CUDA indexing)",
      py::arg("index_bits") = 0);
  def_checked<kBackward, true>(
      m, "restructurize_unfold_backward_emulated", &t2t::restructurize_unfold_backward_emulated, kBackwardBuffers,
      "The CUDA backward kernels run serially on CPU memory (tests of the CUDA indexing)",
      py::arg("index_bits") = 0);
  m.def(
      "restructurize_unfold_backward_plan",
      [](std::uintptr_t dy, std::uintptr_t dx, const Quad& sizes, const Pair& kernel, const Pair& stride,
         const Pair& padding, const Quad& strides, int dtype, int index_bits) {
        const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
        if (index_bits != 32 && index_bits != 64) {
          throw py::value_error("restructurize_unfold: index_bits must be 32 or 64");
        }
        const auto p = t2t::backward_plan(g, element_size(dtype), dy, dx, index_bits / 8);
        py::dict plan;
        for (const auto& [name, value] :
             {std::pair<const char*, int64_t>{"tile_h", p.tile_h}, {"tile_w", p.tile_w},
              {"channels_per_tile", p.channels_per_tile}, {"tiles", p.tiles}, {"table_bytes", p.table_bytes},
              {"stage_bytes", p.stage_bytes}, {"granule", p.granule}, {"load_bytes", p.load_bytes}}) {
          plan[name] = value;
        }
        return plan;
      },
      py::arg("dy"), py::arg("dx"), py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("strides"), py::arg("dtype"), py::arg("index_bits"),
      "The staged CUDA backward's tiling for these addresses and this geometry (tiles == 0: the unstaged "
      "kernels run); reads no memory");
#ifdef T2T_WITH_CUDA
  def_checked<kForward, false>(
      m, "restructurize_unfold_forward_cuda", &t2t::restructurize_unfold_forward_cuda, kForwardBuffers,
      "CUDA forward on `stream` (a cudaStream_t as an integer); raises RuntimeError on a CUDA error",
      py::arg("device"), py::arg("stream"));
  def_checked<kBackward, false>(
      m, "restructurize_unfold_backward_cuda", &t2t::restructurize_unfold_backward_cuda, kBackwardBuffers,
      "CUDA backward on `stream`; raises RuntimeError on a CUDA error", py::arg("device"), py::arg("stream"));
#endif
}
