// CUDA kernels of the fused re-structurize + unfold: one launch per direction for the whole batch, on the
// caller's stream. Each thread's work is a restructurize_unfold.h function (forward_row, backward_pixel),
// which the CPU tests run through restructurize_unfold_*_emulated; indices are 32-bit whenever every
// offset fits.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "restructurize_unfold.h"

namespace t2t {
namespace {

constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // grid-stride beyond this

// A block is (tx, ty): ty rows of `row_elems` elements, tx = row_threads(row_elems) threads along a row.
struct RowLaunch {
  dim3 block;
  unsigned grid;
};

RowLaunch row_launch(int64_t row_elems, int64_t rows) {
  const int64_t tx = row_threads(row_elems);
  const int64_t ty = kThreadsPerBlock / tx > 0 ? kThreadsPerBlock / tx : 1;
  int64_t blocks = (rows + ty - 1) / ty;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return {dim3(unsigned(tx), unsigned(ty)), unsigned(blocks)};
}

// One output row per block row (threadIdx.y); its threads along the features (forward_row).
template <typename T, typename I>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, Geometry<I> g) {
  const I rows = output_rows(g);
  const FeatureCursor<I> start(g, I(threadIdx.x), I(blockDim.x));
  for (I row = I(blockIdx.x) * I(blockDim.y) + I(threadIdx.y); row < rows; row += I(gridDim.x) * I(blockDim.y)) {
    forward_row(x, y, g, row, start, I(threadIdx.x), I(blockDim.x));
  }
}

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
  const RowLaunch launch = row_launch(features(g), output_rows(g));
  forward_kernel<T, I><<<launch.grid, launch.block, 0, stream>>>(reinterpret_cast<const T*>(x),
                                                                 reinterpret_cast<T*>(y), g.template as<I>());
}

template <int D, typename I>
void launch_backward(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, bool channels_last, cudaStream_t stream) {
  using T = typename Scalar<D>::storage;
  const T* grad_out = reinterpret_cast<const T*>(dy);
  T* grad_in = reinterpret_cast<T*>(dx);
  if (channels_last) {
    const RowLaunch launch = row_launch(g.channels, g.batch * g.height * g.width);
    backward_channels_last_kernel<D, I><<<launch.grid, launch.block, 0, stream>>>(grad_out, grad_in,
                                                                                   g.template as<I>());
  } else {
    const int64_t pixels = g.batch * g.height * g.width;
    int64_t blocks = (pixels + kThreadsPerBlock - 1) / kThreadsPerBlock;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    backward_pixel_kernel<D, I><<<unsigned(blocks), unsigned(kThreadsPerBlock), 0, stream>>>(
        grad_out, grad_in, g.template as<I>());
  }
}

template <int D>
void backward_typed(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, bool channels_last, cudaStream_t stream) {
  if (fits_int32(g)) {
    launch_backward<D, int32_t>(dy, dx, g, channels_last, stream);
  } else {
    launch_backward<D, int64_t>(dy, dx, g, channels_last, stream);
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

void restructurize_unfold_backward_cuda(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, bool channels_last,
                                        int dtype, int device, uintptr_t stream_handle) {
  set_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_dtype(dtype, [&](auto d) { backward_typed<decltype(d)::value>(dy, dx, g, channels_last, stream); });
  check(cudaGetLastError(), "backward kernel launch");
}

}  // namespace t2t
