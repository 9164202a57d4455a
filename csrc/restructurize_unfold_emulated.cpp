// The CUDA kernels' thread work, run serially on the CPU: every (row, thread) of the forward launch and every
// (pixel, thread) of the backward launch, with the launch's threads per row and index type. The CPU tests
// compare these with the reference, which checks the CUDA indexing on machines without a GPU.
#include <cstdint>

#include "restructurize_unfold.h"

namespace t2t {
namespace {

bool use_int32(const UnfoldGeometry& g, int index_bits) {
  if (index_bits != 0 && index_bits != 32 && index_bits != 64) {
    throw std::invalid_argument("restructurize_unfold: index_bits must be 0, 32 or 64, got " +
                                std::to_string(index_bits));
  }
  if (index_bits == 32 && !fits_int32(g)) {
    throw std::invalid_argument("restructurize_unfold: these sizes need 64-bit indices");
  }
  return index_bits == 0 ? fits_int32(g) : index_bits == 32;
}

template <typename T, typename I>
void forward_threads(const T* x, T* y, const UnfoldGeometry& g64) {
  const Geometry<I> g = g64.template as<I>();
  const I threads = I(row_threads(features(g64)));  // blockDim.x of forward_kernel
  for (I thread = 0; thread < threads; ++thread) {
    const FeatureCursor<I> start(g, thread, threads);
    for (I row = 0; row < output_rows(g); ++row) forward_row(x, y, g, row, start, thread, threads);
  }
}

template <int D, typename I>
void backward_threads(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                      const UnfoldGeometry& g64, bool channels_last) {
  const Geometry<I> g = g64.template as<I>();
  // blockDim.x of backward_channels_last_kernel; backward_pixel_kernel has one thread per pixel.
  const I threads = channels_last ? I(row_threads(g64.channels)) : I(1);
  const I pixels = g.batch * g.height * g.width;
  for (I pixel = 0; pixel < pixels; ++pixel) {
    for (I thread = 0; thread < threads; ++thread) backward_pixel<D>(dy, dx, g, pixel, thread, threads);
  }
}

}  // namespace

void restructurize_unfold_forward_emulated(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype,
                                           int index_bits) {
  const bool narrow = use_int32(g, index_bits);
  dispatch_dtype(dtype, [&](auto d) {
    using T = StorageBits<decltype(d)::value>;
    const T* in = reinterpret_cast<const T*>(x);
    T* out = reinterpret_cast<T*>(y);
    narrow ? forward_threads<T, int32_t>(in, out, g) : forward_threads<T, int64_t>(in, out, g);
  });
}

void restructurize_unfold_backward_emulated(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g,
                                            bool channels_last, int dtype, int index_bits) {
  const bool narrow = use_int32(g, index_bits);
  dispatch_dtype(dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    using T = typename Scalar<D>::storage;
    const T* grad_out = reinterpret_cast<const T*>(dy);
    T* grad_in = reinterpret_cast<T*>(dx);
    narrow ? backward_threads<D, int32_t>(grad_out, grad_in, g, channels_last)
           : backward_threads<D, int64_t>(grad_out, grad_in, g, channels_last);
  });
}

}  // namespace t2t
