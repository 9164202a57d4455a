// Fused re-structurize + unfold (im2col) of T2T-ViT: index arithmetic shared by the CPU and CUDA kernels.
//
// The input is viewed as (B, C, H, W) through four element strides, so one code path serves both token
// input (B, H*W, C) with a grid (strides (s0, s2, W*s1, s1)) and NCHW images. The output is (B, L, F),
// contiguous, with L = OH*OW windows row-major and F = C*KH*KW features ordered (c, ki, kj) as F.unfold.
// Everything here is __host__ __device__, so the CPU tests exercise the indexing the CUDA kernels use.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef __CUDACC__
#define T2T_HD __host__ __device__ __forceinline__
#else
#define T2T_HD inline
#endif

namespace t2t {

// dtype codes crossing the Python boundary (t2t_fast/ops/restructurize_unfold.py: _DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Sizes and strides; I is int64_t on the CPU, int32_t in CUDA kernels whenever every offset fits.
template <typename I>
struct Geometry {
  I batch, channels, height, width;
  I kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  I out_h, out_w;
  // Element strides of the unfold input (forward: x; backward: dx) viewed as (B, C, H, W).
  I stride_b, stride_c, stride_y, stride_x;

  template <typename J>
  Geometry<J> as() const {
    return {J(batch),    J(channels), J(height),   J(width),    J(kernel_h), J(kernel_w),
            J(stride_h), J(stride_w), J(pad_h),    J(pad_w),    J(out_h),    J(out_w),
            J(stride_b), J(stride_c), J(stride_y), J(stride_x)};
  }
};
using UnfoldGeometry = Geometry<int64_t>;

template <typename I>
T2T_HD I unfold_out_size(I in, I kernel, I stride, I pad) {
  return (in + 2 * pad - kernel) / stride + 1;  // callers check in + 2*pad >= kernel first
}

template <typename I> T2T_HD I window_elems(const Geometry<I>& g) { return g.kernel_h * g.kernel_w; }
template <typename I> T2T_HD I features(const Geometry<I>& g) { return g.channels * g.kernel_h * g.kernel_w; }
template <typename I> T2T_HD I output_rows(const Geometry<I>& g) { return g.batch * g.out_h * g.out_w; }

// Output row (b*L + oh*OW + ow) -> (b, oh, ow).
template <typename I>
T2T_HD void split_row(const Geometry<I>& g, I row, I& b, I& oh, I& ow) {
  ow = row % g.out_w;
  const I rest = row / g.out_w;
  oh = rest % g.out_h;
  b = rest / g.out_h;
}

// Feature index f = c*KH*KW + ki*KW + kj -> (c, ki, kj).
template <typename I>
T2T_HD void split_feature(const Geometry<I>& g, I f, I& c, I& ki, I& kj) {
  kj = f % g.kernel_w;
  const I rest = f / g.kernel_w;
  ki = rest % g.kernel_h;
  c = rest / g.kernel_h;
}

// Spatial element offset of tap (ki, kj) of window (oh, ow), or -1 when the tap lies in the zero padding.
template <typename I>
T2T_HD I tap_offset(const Geometry<I>& g, I oh, I ow, I ki, I kj) {
  const I iy = oh * g.stride_h - g.pad_h + ki;
  const I ix = ow * g.stride_w - g.pad_w + kj;
  if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) return -1;
  return iy * g.stride_y + ix * g.stride_x;
}

// Walks features f = c*KH*KW + ki*KW + kj in steps of a fixed size without dividing per step.
template <typename I>
struct FeatureCursor {
  I c, ki, kj;     // position
  I dc, dki, dkj;  // the step, split the same way

  T2T_HD FeatureCursor(const Geometry<I>& g, I start, I step) {
    split_feature(g, start, c, ki, kj);
    split_feature(g, step, dc, dki, dkj);
  }
  T2T_HD void advance(const Geometry<I>& g) {
    kj += dkj;
    ki += dki;
    c += dc;
    if (kj >= g.kernel_w) {
      kj -= g.kernel_w;
      ++ki;
    }
    if (ki >= g.kernel_h) {
      ki -= g.kernel_h;
      ++c;
    }
  }
};

// Taps k of window o along one axis that read inside the input [0, size), as [begin, end): tap k reads input
// position o*stride - pad + k. Empty (begin >= end) when the whole window lies in the padding.
template <typename I>
T2T_HD void taps_inside(I o, I kernel, I stride, I pad, I size, I& begin, I& end) {
  const I first = o * stride - pad;
  begin = first < 0 ? -first : 0;
  end = size - first < kernel ? size - first : kernel;
}

// Windows o (0 <= o < out) whose taps o*stride - pad + k', 0 <= k' < kernel, cover input position i:
// first..last inclusive (empty when first > last).
template <typename I>
T2T_HD void covering_windows(I i, I kernel, I stride, I pad, I out, I& first, I& last) {
  const I lo = i + pad - kernel + 1;  // o*stride >= lo
  first = lo <= 0 ? 0 : (lo + stride - 1) / stride;
  last = (i + pad) / stride;          // o*stride <= i + pad, and i + pad >= 0
  if (last > out - 1) last = out - 1;
}

// Pixel index b*H*W + y*W + x -> (b, y, x).
template <typename I>
T2T_HD void split_pixel(const Geometry<I>& g, I pixel, I& b, I& y, I& x) {
  x = pixel % g.width;
  const I rest = pixel / g.width;
  y = rest % g.height;
  b = rest / g.height;
}

// Offset into dy (B, L, F) of tap (ki, kj), channel 0, of window (oh, ow) of image b.
template <typename I>
T2T_HD I grad_output_offset(const Geometry<I>& g, I b, I oh, I ow, I ki, I kj) {
  return ((b * g.out_h + oh) * g.out_w + ow) * features(g) + ki * g.kernel_w + kj;
}

// ---------------------------------------------------------------------------------------- scalar types

T2T_HD uint32_t float_bits(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

T2T_HD float bits_float(uint32_t u) {
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

T2T_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

T2T_HD uint16_t float_to_bf16(float v) {  // round to nearest even, NaN stays NaN
  const uint32_t u = float_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

T2T_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

T2T_HD uint16_t float_to_half(float v) {  // round to nearest even (normals, subnormals, overflow to inf)
  const uint32_t u = float_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: subnormal half, units of 2^-24
    const float scaled = bits_float(magnitude) * 16777216.0f;  // exact (power of two)
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
}

// Storage and accumulation types per dtype: gradients accumulate in fp32 (fp64 for float64).
template <int D> struct Scalar;
template <> struct Scalar<kFloat32> {
  using storage = float;
  using acc = float;
  static T2T_HD acc load(storage v) { return v; }
  static T2T_HD storage store(acc v) { return v; }
};
template <> struct Scalar<kFloat64> {
  using storage = double;
  using acc = double;
  static T2T_HD acc load(storage v) { return v; }
  static T2T_HD storage store(acc v) { return v; }
};
template <> struct Scalar<kFloat16> {
  using storage = uint16_t;
  using acc = float;
  static T2T_HD acc load(storage v) { return half_to_float(v); }
  static T2T_HD storage store(acc v) { return float_to_half(v); }
};
template <> struct Scalar<kBFloat16> {
  using storage = uint16_t;
  using acc = float;
  static T2T_HD acc load(storage v) { return bf16_to_float(v); }
  static T2T_HD storage store(acc v) { return float_to_bf16(v); }
};

// The windows covering one input pixel (b, y, x), as offsets into dy: window (oh0 + i, ow0 + j) reads the
// pixel's channel c at dy[first + i*row_step + j*window_step + c*KH*KW].
template <typename I>
struct PixelWindows {
  I rows, cols;                     // covering windows along y and x (0 when none)
  I first, row_step, window_step;

  T2T_HD PixelWindows(const Geometry<I>& g, I b, I y, I x) {
    I oh0, oh1, ow0, ow1;
    covering_windows(y, g.kernel_h, g.stride_h, g.pad_h, g.out_h, oh0, oh1);
    covering_windows(x, g.kernel_w, g.stride_w, g.pad_w, g.out_w, ow0, ow1);
    init(g, b, y, x, oh0, oh1, ow0, ow1);
  }
  // From covering_windows ranges the caller already has (the CPU kernels tabulate them once per call).
  T2T_HD PixelWindows(const Geometry<I>& g, I b, I y, I x, I oh0, I oh1, I ow0, I ow1) {
    init(g, b, y, x, oh0, oh1, ow0, ow1);
  }

 private:
  T2T_HD void init(const Geometry<I>& g, I b, I y, I x, I oh0, I oh1, I ow0, I ow1) {
    rows = oh1 >= oh0 ? oh1 - oh0 + 1 : 0;
    cols = ow1 >= ow0 ? ow1 - ow0 + 1 : 0;
    first = rows > 0 && cols > 0
                ? grad_output_offset(g, b, oh0, ow0, y + g.pad_h - oh0 * g.stride_h, x + g.pad_w - ow0 * g.stride_w)
                : 0;
    // One window right: the next dy row, the tap stride_w columns left (one window down: likewise).
    window_step = features(g) - g.stride_w;
    row_step = g.out_w * features(g) - g.stride_h * g.kernel_w;
  }
};

// dx at pixel (b, y, x), channels c_begin, c_begin + c_step, ...: each is the sum, over the windows covering
// the pixel, of dy at the tap that reads it, visited in a fixed order (oh, then ow ascending): deterministic,
// and the same numbers on CPU and CUDA.
template <int D, typename I>
T2T_HD void gather_pixel_grad(const Geometry<I>& g, const typename Scalar<D>::storage* dy,
                              typename Scalar<D>::storage* dx, const PixelWindows<I>& w, I b, I y, I x, I c_begin,
                              I c_step) {
  const I taps = window_elems(g);
  typename Scalar<D>::storage* dst = dx + b * g.stride_b + y * g.stride_y + x * g.stride_x;
  for (I c = c_begin; c < g.channels; c += c_step) {
    typename Scalar<D>::acc sum = 0;
    I row = w.first + c * taps;
    for (I i = 0; i < w.rows; ++i, row += w.row_step) {
      I offset = row;
      for (I j = 0; j < w.cols; ++j, offset += w.window_step) sum += Scalar<D>::load(dy[offset]);
    }
    dst[c * g.stride_c] = Scalar<D>::store(sum);
  }
}

// ------------------------------------------------------------------- one thread of the CUDA kernels
// The CUDA kernels are thin loops over these; restructurize_unfold_*_emulated run them serially on the CPU
// over every thread of the same launch shape, so the CPU tests check the CUDA indexing without a GPU.

constexpr int64_t kThreadsPerBlock = 256;

// Threads along a row of `row_elems` elements: a multiple of 32 that covers the row in equal passes of at
// most kThreadsPerBlock threads.
inline int64_t row_threads(int64_t row_elems) {
  const int64_t passes = (row_elems + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t threads = 32 * ((row_elems + 32 * passes - 1) / (32 * passes));
  return threads < 32 ? 32 : threads;
}

// True when every index the kernels form stays below 2^31, grid-stride increments included.
inline bool fits_int32(const UnfoldGeometry& g) {
  const int64_t input_extent = (g.batch - 1) * g.stride_b + (g.channels - 1) * g.stride_c +
                               (g.height - 1) * g.stride_y + (g.width - 1) * g.stride_x + 1;
  const int64_t output_elems = output_rows(g) * features(g);
  const int64_t input_elems = g.batch * g.channels * g.height * g.width;
  int64_t largest = input_extent > output_elems ? input_extent : output_elems;
  if (input_elems > largest) largest = input_elems;
  return largest < std::numeric_limits<int32_t>::max() / 2 - kThreadsPerBlock;
}

// Forward: thread `thread` of the `threads` along output row `row` writes its features thread,
// thread + threads, ... (consecutive threads, consecutive features: coalesced stores). `start` is
// FeatureCursor(g, thread, threads), built once per thread instead of once per row.
template <typename T, typename I>
T2T_HD void forward_row(const T* x, T* y, const Geometry<I>& g, I row, const FeatureCursor<I>& start, I thread,
                        I threads) {
  I b, oh, ow;
  split_row(g, row, b, oh, ow);
  const T* image = x + b * g.stride_b;
  T* out = y + row * features(g);
  FeatureCursor<I> cursor = start;
  for (I f = thread; f < features(g); f += threads) {
    const I tap = tap_offset(g, oh, ow, cursor.ki, cursor.kj);
    out[f] = tap < 0 ? T(0) : image[cursor.c * g.stride_c + tap];
    cursor.advance(g);
  }
}

// Backward: thread `thread` of the `threads` at input pixel b*H*W + y*W + x gathers dx for its channels.
template <int D, typename I>
T2T_HD void backward_pixel(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                           const Geometry<I>& g, I pixel, I thread, I threads) {
  I b, y, x;
  split_pixel(g, pixel, b, y, x);
  gather_pixel_grad<D>(g, dy, dx, PixelWindows<I>(g, b, y, x), b, y, x, thread, threads);
}

// ------------------------------------------------------------------------------------- dtype dispatch

// The forward moves elements as unsigned words of the dtype's size (bit for bit, NaN payloads included).
template <int D>
using StorageBits = std::conditional_t<sizeof(typename Scalar<D>::storage) == 2, uint16_t,
                                       std::conditional_t<sizeof(typename Scalar<D>::storage) == 4, uint32_t,
                                                          uint64_t>>;

// f(std::integral_constant<int, D>{}) for the dtype code; an unknown code is an std::invalid_argument.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      return f(std::integral_constant<int, kFloat32>{});
    case kFloat16:
      return f(std::integral_constant<int, kFloat16>{});
    case kBFloat16:
      return f(std::integral_constant<int, kBFloat16>{});
    case kFloat64:
      return f(std::integral_constant<int, kFloat64>{});
    default:
      throw std::invalid_argument("restructurize_unfold: unknown dtype code " + std::to_string(dtype));
  }
}

// ------------------------------------------------------------------------------------------ entry points

// Forward: y (B, L, F) contiguous from x (strides in g). Copies elements bit for bit (padding = +0).
// The CPU kernels run on `threads` OpenMP threads (fewer than 1 means 1).
void restructurize_unfold_forward_cpu(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int threads);
// Backward: dx (strides in g, contiguous in its layout) from dy (B, L, F) contiguous.
void restructurize_unfold_backward_cpu(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype,
                                       int threads);
// The CUDA kernels' thread work (forward_row, backward_pixel) run serially on the CPU, with the CUDA
// launch's threads per row and index type (index_bits 32 or 64; 0 picks as the CUDA path does).
void restructurize_unfold_forward_emulated(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype,
                                           int index_bits);
void restructurize_unfold_backward_emulated(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g,
                                            bool channels_last, int dtype, int index_bits);
#ifdef T2T_WITH_CUDA
// Same on the GPU: one launch over the whole batch on `stream` (a cudaStream_t as an integer) of `device`.
// Throws std::runtime_error on a CUDA error.
void restructurize_unfold_forward_cuda(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int device,
                                       uintptr_t stream);
void restructurize_unfold_backward_cuda(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, bool channels_last,
                                        int dtype, int device, uintptr_t stream);
#endif

}  // namespace t2t
