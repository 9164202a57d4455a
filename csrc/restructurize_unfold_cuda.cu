// CUDA kernels of the fused re-structurize + unfold: one launch per direction for the whole batch, on the
// caller's stream. Each thread's work is a restructurize_unfold.h function (staged_table / staged_load /
// staged_store, forward_row, backward_table / backward_stage_load / backward_stage_sum, backward_pixel), which
// the CPU tests run through restructurize_unfold_*_emulated; indices are 32-bit whenever every offset fits.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "restructurize_unfold.h"

namespace t2t {
namespace {

// A block is (tx, ty): ty rows of `row_elems` elements, tx = row_threads(row_elems) threads along a row.
struct RowLaunch {
  dim3 block;
  unsigned grid;
};

RowLaunch row_launch(int64_t row_elems, int64_t rows) {
  const int64_t tx = row_threads(row_elems);
  const int64_t ty = kThreadsPerBlock / tx > 0 ? kThreadsPerBlock / tx : 1;
  return {dim3(unsigned(tx), unsigned(ty)), unsigned(launch_blocks(ceil_div(rows, ty)))};
}

// Token input: tiles of the output through shared memory (staged_plan), loads along the channels. A minimum of
// one block per SM in the launch bounds: without it ptxas aimed at 64 registers and spilled the 64-bit-index
// 16-bit variants (both staged kernels).
template <typename T, typename I, int G, int StoreBytes>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    staged_forward_kernel(const T* __restrict__ x, T* __restrict__ y, Geometry<I> g, StagedPlan<I> p) {
  extern __shared__ __align__(16) unsigned char shared[];
  I* table = reinterpret_cast<I*>(shared);
  T* stage = reinterpret_cast<T*>(shared + p.table_bytes);
  for (I index = I(blockIdx.x); index < p.tiles; index += I(gridDim.x)) {
    const StagedTile<I> tile(g, p, index);
    staged_table(g, tile, table, I(threadIdx.x), I(blockDim.x));
    __syncthreads();
    staged_load<G>(x, g, tile, table, stage, I(threadIdx.x), I(blockDim.x));
    __syncthreads();
    staged_store<Bits<StoreBytes>>(y, g, tile, stage, I(threadIdx.x), I(blockDim.x));
    __syncthreads();  // the next tile's phases overwrite the table and the stage
  }
}

// Images: one output row per block row (threadIdx.y); its threads along the features (forward_row).
template <typename T, typename I>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, Geometry<I> g) {
  const I rows = output_rows(g);
  const DigitCursor<I> start(I(threadIdx.x), I(blockDim.x), g.kernel_h, g.kernel_w);
  for (I row = I(blockIdx.x) * I(blockDim.y) + I(threadIdx.y); row < rows; row += I(gridDim.x) * I(blockDim.y)) {
    forward_row(x, y, g, row, start, I(threadIdx.x), I(blockDim.x));
  }
}

// Tiles of dx through shared memory (backward_plan): loads of dy along its rows, sums from the stage.
template <int D, typename I, int G, int LoadBytes>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    staged_backward_kernel(const typename Scalar<D>::storage* __restrict__ dy,
                           typename Scalar<D>::storage* __restrict__ dx, Geometry<I> g, BackwardPlan<I> p) {
  extern __shared__ __align__(16) unsigned char shared[];
  I* table = reinterpret_cast<I*>(shared);
  auto* stage = reinterpret_cast<typename Scalar<D>::storage*>(shared + p.table_bytes);
  for (I index = I(blockIdx.x); index < p.tiles; index += I(gridDim.x)) {
    const BackwardTile<I> tile(g, p, index);
    backward_table(g, p, tile, table, I(threadIdx.x), I(blockDim.x));
    backward_stage_load<Bits<LoadBytes>>(dy, g, tile, stage, I(threadIdx.x), I(blockDim.x));
    __syncthreads();
    backward_stage_sum<D, G>(g, p, tile, table, stage, dx, I(threadIdx.x), I(blockDim.x));
    __syncthreads();  // the next tile's phase 1 overwrites the table and the stage
  }
}

// Fallbacks (backward_plan finds no tile that fits in shared memory).
// Channels-last dx (token input): one pixel per block row, its threads along channels (coalesced stores).
template <int D, typename I>
__global__ void backward_channels_last_kernel(const typename Scalar<D>::storage* __restrict__ dy,
                                              typename Scalar<D>::storage* __restrict__ dx, Geometry<I> g) {
  const I pixels = g.batch * g.height * g.width;
  for (I pixel = I(blockIdx.x) * I(blockDim.y) + I(threadIdx.y); pixel < pixels;
       pixel += I(gridDim.x) * I(blockDim.y)) {
    backward_pixel<D>(dy, dx, g, pixel, I(threadIdx.x), I(blockDim.x));
  }
}

// Other dx layouts (NCHW images, one channel): one thread per pixel, consecutive threads along x.
template <int D, typename I>
__global__ void backward_pixel_kernel(const typename Scalar<D>::storage* __restrict__ dy,
                                      typename Scalar<D>::storage* __restrict__ dx, Geometry<I> g) {
  const I pixels = g.batch * g.height * g.width;
  for (I pixel = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); pixel < pixels;
       pixel += I(gridDim.x) * I(blockDim.x)) {
    backward_pixel<D>(dy, dx, g, pixel, I(0), I(1));
  }
}

// What to do about the errors a build/driver/GPU mismatch gives (the runtime is linked statically, so the
// driver must support the CUDA version of the nvcc that built the extension, whatever torch's CUDA is).
std::string remedy(cudaError_t status) {
  const std::string built = "t2t_fast._C was built with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                            std::to_string(CUDART_VERSION % 1000 / 10);
  const std::string fallback = "; or run this op with backend='torch' (or 'triton')";
  switch (status) {
    case cudaErrorInsufficientDriver:
    case cudaErrorUnsupportedPtxVersion:
      return " (" + built + ", newer than this driver supports: rebuild with an nvcc this driver supports" +
             fallback + ")";
    case cudaErrorNoKernelImageForDevice:
      return " (" + built + " for the GPUs named by T2T_FAST_CUDA_ARCHS at install time, default 80;90a: " +
             "reinstall with this GPU's compute capability in T2T_FAST_CUDA_ARCHS" + fallback + ")";
    default:
      return "";
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("restructurize_unfold (CUDA): ") + what + ": " +
                             cudaGetErrorString(status) + remedy(status));
  }
}

void set_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

template <typename T, typename I>
void launch_forward(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, cudaStream_t stream) {
  const T* in = reinterpret_cast<const T*>(x);
  T* out = reinterpret_cast<T*>(y);
  const StagedPlan<int64_t> plan = staged_plan(g, sizeof(T), x, y, sizeof(I));
  if (plan.tiles > 0) {
    dispatch_staged<T>(plan.granule, plan.store_bytes, [&](auto granule, auto store_bytes) {
      staged_forward_kernel<T, I, decltype(granule)::value, decltype(store_bytes)::value>
          <<<unsigned(launch_blocks(plan.tiles)), unsigned(kThreadsPerBlock), plan.table_bytes + plan.stage_bytes,
             stream>>>(in, out, g.template as<I>(), plan.template as<I>());
    });
    return;
  }
  const RowLaunch launch = row_launch(features(g), output_rows(g));
  forward_kernel<T, I><<<launch.grid, launch.block, 0, stream>>>(in, out, g.template as<I>());
}

template <int D, typename I>
void launch_backward(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, cudaStream_t stream) {
  using T = typename Scalar<D>::storage;
  const T* grad_out = reinterpret_cast<const T*>(dy);
  T* grad_in = reinterpret_cast<T*>(dx);
  const BackwardPlan<int64_t> plan = backward_plan(g, sizeof(T), dy, dx, sizeof(I));
  if (plan.tiles > 0) {
    dispatch_staged<T>(plan.granule, plan.load_bytes, [&](auto granule, auto load_bytes) {
      staged_backward_kernel<D, I, decltype(granule)::value, decltype(load_bytes)::value>
          <<<unsigned(launch_blocks(plan.tiles)), unsigned(kThreadsPerBlock), plan.table_bytes + plan.stage_bytes,
             stream>>>(grad_out, grad_in, g.template as<I>(), plan.template as<I>());
    });
    return;
  }
  const int64_t pixels = g.batch * g.height * g.width;
  if (channels_inner(g)) {
    const RowLaunch launch = row_launch(g.channels, pixels);
    backward_channels_last_kernel<D, I><<<launch.grid, launch.block, 0, stream>>>(grad_out, grad_in,
                                                                                   g.template as<I>());
  } else {
    backward_pixel_kernel<D, I>
        <<<unsigned(launch_blocks(ceil_div(pixels, kThreadsPerBlock))), unsigned(kThreadsPerBlock), 0, stream>>>(
            grad_out, grad_in, g.template as<I>());
  }
}

template <int D>
void backward_typed(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, cudaStream_t stream) {
  if (fits_int32(g)) {
    launch_backward<D, int32_t>(dy, dx, g, stream);
  } else {
    launch_backward<D, int64_t>(dy, dx, g, stream);
  }
}

template <typename T>
void forward_typed(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, cudaStream_t stream) {
  if (fits_int32(g)) {
    launch_forward<T, int32_t>(x, y, g, stream);
  } else {
    launch_forward<T, int64_t>(x, y, g, stream);
  }
}

}  // namespace

void restructurize_unfold_forward_cuda(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int device,
                                       uintptr_t stream_handle) {
  set_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_dtype(dtype, [&](auto d) { forward_typed<StorageBits<decltype(d)::value>>(x, y, g, stream); });
  check(cudaGetLastError(), "forward kernel launch");
}

void restructurize_unfold_backward_cuda(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype, int device,
                                        uintptr_t stream_handle) {
  set_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_dtype(dtype, [&](auto d) { backward_typed<decltype(d)::value>(dy, dx, g, stream); });
  check(cudaGetLastError(), "backward kernel launch");
}

}  // namespace t2t
