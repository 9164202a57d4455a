// CUDA kernels of the fused re-structurize + unfold: one launch per direction for the whole batch, on the
// caller's stream. Index arithmetic comes from restructurize_unfold.h (shared with, and tested through, the
// CPU kernels); it runs in 32-bit integers whenever every offset fits.
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "restructurize_unfold.h"

namespace t2t {
namespace {

constexpr int64_t kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // grid-stride beyond this

// A block is (tx, ty): ty rows of `row_elems` elements, tx threads (a multiple of 32) along a row, chosen so
// a row is covered in equal passes of at most 256 threads.
struct RowLaunch {
  dim3 block;
  unsigned grid;
};

RowLaunch row_launch(int64_t row_elems, int64_t rows) {
  const int64_t passes = (row_elems + kThreadsPerBlock - 1) / kThreadsPerBlock;
  int64_t tx = 32 * ((row_elems + 32 * passes - 1) / (32 * passes));
  if (tx < 32) tx = 32;
  const int64_t ty = kThreadsPerBlock / tx > 0 ? kThreadsPerBlock / tx : 1;
  int64_t blocks = (rows + ty - 1) / ty;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return {dim3(unsigned(tx), unsigned(ty)), unsigned(blocks)};
}

// y[row, f] = x[b, c, iy, ix] or 0: threads of a row write consecutive features (coalesced stores); the
// (c, ki, kj) of each thread advances by a fixed step without division.
template <typename T, typename I>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, Geometry<I> g) {
  const I rows = output_rows(g);
  const I row_features = features(g);
  const FeatureCursor<I> start(g, I(threadIdx.x), I(blockDim.x));
  for (I row = I(blockIdx.x) * I(blockDim.y) + I(threadIdx.y); row < rows; row += I(gridDim.x) * I(blockDim.y)) {
    I b, oh, ow;
    split_row(g, row, b, oh, ow);
    const T* image = x + b * g.stride_b;
    T* out = y + row * row_features;
    FeatureCursor<I> cursor = start;
    for (I f = I(threadIdx.x); f < row_features; f += I(blockDim.x)) {
      const I tap = tap_offset(g, oh, ow, cursor.ki, cursor.kj);
      out[f] = tap < 0 ? T(0) : image[cursor.c * g.stride_c + tap];
      cursor.advance(g);
    }
  }
}

// Channels-last dx (token input): one pixel per row of the block, its threads along channels (coalesced
// stores).
template <int D, typename I>
__global__ void backward_channels_last_kernel(const typename Scalar<D>::storage* __restrict__ dy,
                                              typename Scalar<D>::storage* __restrict__ dx, Geometry<I> g) {
  const I pixels = g.batch * g.height * g.width;
  for (I pixel = I(blockIdx.x) * I(blockDim.y) + I(threadIdx.y); pixel < pixels;
       pixel += I(gridDim.x) * I(blockDim.y)) {
    I b, y, x;
    split_pixel(g, pixel, b, y, x);
    gather_pixel_grad<D>(g, dy, dx, PixelWindows<I>(g, b, y, x), b, y, x, I(threadIdx.x), I(blockDim.x));
  }
}

// Other dx layouts (NCHW images, few channels): one thread per pixel, consecutive threads along x.
template <int D, typename I>
__global__ void backward_pixel_kernel(const typename Scalar<D>::storage* __restrict__ dy,
                                      typename Scalar<D>::storage* __restrict__ dx, Geometry<I> g) {
  const I pixels = g.batch * g.height * g.width;
  for (I pixel = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); pixel < pixels;
       pixel += I(gridDim.x) * I(blockDim.x)) {
    I b, y, x;
    split_pixel(g, pixel, b, y, x);
    gather_pixel_grad<D>(g, dy, dx, PixelWindows<I>(g, b, y, x), b, y, x, I(0), I(1));
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("restructurize_unfold (CUDA): ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

// True when every index the kernels form stays below 2^31, grid-stride increments included.
bool fits_int32(const UnfoldGeometry& g) {
  const int64_t input_extent = (g.batch - 1) * g.stride_b + (g.channels - 1) * g.stride_c +
                               (g.height - 1) * g.stride_y + (g.width - 1) * g.stride_x + 1;
  const int64_t output_elems = output_rows(g) * features(g);
  const int64_t input_elems = g.batch * g.channels * g.height * g.width;
  const int64_t largest = std::max(input_extent, std::max(output_elems, input_elems));
  return largest < std::numeric_limits<int32_t>::max() / 2 - kThreadsPerBlock;
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
  switch (dtype) {
    case kFloat32:
      forward_typed<uint32_t>(x, y, g, stream);
      break;
    case kFloat16:
    case kBFloat16:
      forward_typed<uint16_t>(x, y, g, stream);
      break;
    case kFloat64:
      forward_typed<uint64_t>(x, y, g, stream);
      break;
    default:
      throw std::invalid_argument("restructurize_unfold: unknown dtype code " + std::to_string(dtype));
  }
  check(cudaGetLastError(), "forward kernel launch");
}

void restructurize_unfold_backward_cuda(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, bool channels_last,
                                        int dtype, int device, uintptr_t stream_handle) {
  set_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case kFloat32:
      backward_typed<kFloat32>(dy, dx, g, channels_last, stream);
      break;
    case kFloat16:
      backward_typed<kFloat16>(dy, dx, g, channels_last, stream);
      break;
    case kBFloat16:
      backward_typed<kBFloat16>(dy, dx, g, channels_last, stream);
      break;
    case kFloat64:
      backward_typed<kFloat64>(dy, dx, g, channels_last, stream);
      break;
    default:
      throw std::invalid_argument("restructurize_unfold: unknown dtype code " + std::to_string(dtype));
  }
  check(cudaGetLastError(), "backward kernel launch");
}

}  // namespace t2t
