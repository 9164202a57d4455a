// The CUDA kernels run serially on the CPU, block by block over the grid of the CUDA launch, with its threads
// per block and index type. Shared memory is a host array; the phases between two __syncthreads each run for
// all of a block's threads before the next phase starts. The CPU tests compare the results with the
// reference, which checks the CUDA indexing on machines without a GPU.
#include <cstdint>
#include <vector>

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

// staged_forward_kernel: each block takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...
template <typename T, typename I, int G, int StoreBytes>
void staged_forward_blocks(const T* x, T* y, const Geometry<I>& g, const StagedPlan<I>& p) {
  std::vector<Bits128> shared(ceil_div(p.table_bytes + p.stage_bytes, sizeof(Bits128)));  // 16-byte aligned
  I* table = reinterpret_cast<I*>(shared.data());
  T* stage = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(shared.data()) + p.table_bytes);
  const I blocks = I(launch_blocks(p.tiles));
  const I threads = I(kThreadsPerBlock);
  for (I block = 0; block < blocks; ++block) {
    for (I index = block; index < p.tiles; index += blocks) {
      const StagedTile<I> tile(g, p, index);
      for (I thread = 0; thread < threads; ++thread) staged_table(g, tile, table, thread, threads);
      for (I thread = 0; thread < threads; ++thread) staged_load<G>(x, g, tile, table, stage, thread, threads);
      for (I thread = 0; thread < threads; ++thread) {
        staged_store<Bits<StoreBytes>>(y, g, tile, stage, thread, threads);
      }
    }
  }
}

template <typename T, typename I>
void forward_threads(const T* x, T* y, const UnfoldGeometry& g64) {
  const Geometry<I> g = g64.template as<I>();
  const StagedPlan<int64_t> plan = staged_plan(g64, sizeof(T), reinterpret_cast<uintptr_t>(x),
                                               reinterpret_cast<uintptr_t>(y), sizeof(I));
  if (plan.tiles > 0) {
    dispatch_staged<T>(plan.granule, plan.store_bytes, [&](auto granule, auto store_bytes) {
      staged_forward_blocks<T, I, decltype(granule)::value, decltype(store_bytes)::value>(x, y, g,
                                                                                         plan.template as<I>());
    });
    return;
  }
  const I threads = I(row_threads(features(g64)));  // blockDim.x of forward_kernel
  for (I thread = 0; thread < threads; ++thread) {
    const DigitCursor<I> start(thread, threads, g.kernel_h, g.kernel_w);
    for (I row = 0; row < output_rows(g); ++row) forward_row(x, y, g, row, start, thread, threads);
  }
}

// staged_backward_kernel: each block takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...
template <int D, typename I, int G, int LoadBytes>
void staged_backward_blocks(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                            const Geometry<I>& g, const BackwardPlan<I>& p) {
  std::vector<Bits128> shared(ceil_div(p.table_bytes + p.stage_bytes, sizeof(Bits128)));  // 16-byte aligned
  I* table = reinterpret_cast<I*>(shared.data());
  auto* stage =
      reinterpret_cast<typename Scalar<D>::storage*>(reinterpret_cast<unsigned char*>(shared.data()) + p.table_bytes);
  const I blocks = I(launch_blocks(p.tiles));
  const I threads = I(kThreadsPerBlock);
  for (I block = 0; block < blocks; ++block) {
    for (I index = block; index < p.tiles; index += blocks) {
      const BackwardTile<I> tile(g, p, index);
      for (I thread = 0; thread < threads; ++thread) {
        backward_table(g, p, tile, table, thread, threads);
        backward_stage_load<Bits<LoadBytes>>(dy, g, tile, stage, thread, threads);
      }
      for (I thread = 0; thread < threads; ++thread) {
        backward_stage_sum<D, G>(g, p, tile, table, stage, dx, thread, threads);
      }
    }
  }
}

template <int D, typename I>
void backward_threads(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                      const UnfoldGeometry& g64) {
  const Geometry<I> g = g64.template as<I>();
  const BackwardPlan<int64_t> plan = backward_plan(g64, sizeof(*dy), reinterpret_cast<uintptr_t>(dy),
                                                   reinterpret_cast<uintptr_t>(dx), sizeof(I));
  if (plan.tiles > 0) {
    dispatch_staged<typename Scalar<D>::storage>(plan.granule, plan.load_bytes, [&](auto granule, auto load_bytes) {
      staged_backward_blocks<D, I, decltype(granule)::value, decltype(load_bytes)::value>(dy, dx, g,
                                                                                          plan.template as<I>());
    });
    return;
  }
  // blockDim.x of backward_channels_last_kernel; backward_pixel_kernel has one thread per pixel.
  const I threads = channels_inner(g64) ? I(row_threads(g64.channels)) : I(1);
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

void restructurize_unfold_backward_emulated(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype,
                                            int index_bits) {
  const bool narrow = use_int32(g, index_bits);
  dispatch_dtype(dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    using T = typename Scalar<D>::storage;
    const T* grad_out = reinterpret_cast<const T*>(dy);
    T* grad_in = reinterpret_cast<T*>(dx);
    narrow ? backward_threads<D, int32_t>(grad_out, grad_in, g) : backward_threads<D, int64_t>(grad_out, grad_in, g);
  });
}

}  // namespace t2t
