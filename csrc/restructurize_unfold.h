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
#include <vector>

#include "cpu_isa.h"

#ifdef __CUDACC__
#define T2T_HD __host__ __device__ __forceinline__
#define T2T_UNROLL _Pragma("unroll")
#else
#define T2T_HD inline
#define T2T_UNROLL
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

// Token input (channels the innermost of the input's axes): the kernels work along channels. Images (x the
// innermost axis) and single-channel tokens work along taps.
template <typename I>
T2T_HD bool channels_inner(const Geometry<I>& g) {
  return g.stride_c < g.stride_x;
}

// Spatial element offset of tap (ki, kj) of window (oh, ow), or -1 when the tap lies in the zero padding.
template <typename I>
T2T_HD I tap_offset(const Geometry<I>& g, I oh, I ow, I ki, I kj) {
  const I iy = oh * g.stride_h - g.pad_h + ki;
  const I ix = ow * g.stride_w - g.pad_w + kj;
  if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) return -1;
  return iy * g.stride_y + ix * g.stride_x;
}

// n -> (hi, mid, lo) in a mixed radix: n = (hi*mid_n + mid)*lo_n + lo. A feature index f = c*KH*KW + ki*KW + kj
// is (c, ki, kj) with (mid_n, lo_n) = (KH, KW).
template <typename I>
T2T_HD void split_digits(I n, I mid_n, I lo_n, I& hi, I& mid, I& lo) {
  lo = n % lo_n;
  const I rest = n / lo_n;
  mid = rest % mid_n;
  hi = rest / mid_n;
}

// Output row (b*L + oh*OW + ow) -> (b, oh, ow).
template <typename I>
T2T_HD void split_row(const Geometry<I>& g, I row, I& b, I& oh, I& ow) {
  split_digits(row, g.out_h, g.out_w, b, oh, ow);
}

// Walks n = start, start + step, ... in that radix without dividing per step (the step is split once).
template <typename I>
struct DigitCursor {
  I hi, mid, lo;     // position
  I dhi, dmid, dlo;  // the step, split the same way

  T2T_HD DigitCursor(I start, I step, I mid_n, I lo_n) {
    split_digits(start, mid_n, lo_n, hi, mid, lo);
    split_digits(step, mid_n, lo_n, dhi, dmid, dlo);
  }
  T2T_HD void advance(I mid_n, I lo_n) {
    lo += dlo;
    mid += dmid;
    hi += dhi;
    if (lo >= lo_n) {
      lo -= lo_n;
      ++mid;
    }
    if (mid >= mid_n) {
      mid -= mid_n;
      ++hi;
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
  split_digits(pixel, g.height, g.width, b, y, x);
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

// The windows covering one input pixel, as offsets into a buffer of windows laid out row-major: dy itself
// (F elements per window, OW windows per window row), or the staged backward's copy of a block of them.
// Window (oh0 + i, ow0 + j) reads the pixel's channel c at [first + i*row_step + j*window_step + c*KH*KW].
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
  // Windows of `window_len` elements, `row_windows` to a window row, at `first` (the staged backward).
  T2T_HD PixelWindows(const Geometry<I>& g, I rows_, I cols_, I first_, I window_len, I row_windows)
      : rows(rows_), cols(cols_), first(first_) {
    steps(g, window_len, row_windows);
  }

 private:
  T2T_HD void init(const Geometry<I>& g, I b, I y, I x, I oh0, I oh1, I ow0, I ow1) {
    rows = oh1 >= oh0 ? oh1 - oh0 + 1 : 0;
    cols = ow1 >= ow0 ? ow1 - ow0 + 1 : 0;
    first = rows > 0 && cols > 0
                ? grad_output_offset(g, b, oh0, ow0, y + g.pad_h - oh0 * g.stride_h, x + g.pad_w - ow0 * g.stride_w)
                : 0;
    steps(g, features(g), g.out_w);
  }
  // One window right: the next window, the tap stride_w columns left (one window down: likewise).
  T2T_HD void steps(const Geometry<I>& g, I window_len, I row_windows) {
    window_step = window_len - g.stride_w;
    row_step = row_windows * window_len - g.stride_h * g.kernel_w;
  }
};

// The sum, over the windows covering a pixel, of the tap that reads it (src: the pixel's channel, offset by
// c*KH*KW), visited in a fixed order (oh, then ow ascending) from +0: deterministic, and the same numbers
// whether the windows are read from dy (CPU, fallback CUDA kernels) or from the staged backward's copy.
template <int D, typename I>
T2T_HD typename Scalar<D>::acc sum_windows(const typename Scalar<D>::storage* src, const PixelWindows<I>& w) {
  typename Scalar<D>::acc sum = 0;
  I row = w.first;
  for (I i = 0; i < w.rows; ++i, row += w.row_step) {
    I offset = row;
    for (I j = 0; j < w.cols; ++j, offset += w.window_step) sum += Scalar<D>::load(src[offset]);
  }
  return sum;
}

// dx at pixel (b, y, x), channels c_begin, c_begin + c_step, ...: each is sum_windows over dy.
template <int D, typename I>
T2T_HD void gather_pixel_grad(const Geometry<I>& g, const typename Scalar<D>::storage* dy,
                              typename Scalar<D>::storage* dx, const PixelWindows<I>& w, I b, I y, I x, I c_begin,
                              I c_step) {
  const I taps = window_elems(g);
  typename Scalar<D>::storage* dst = dx + b * g.stride_b + y * g.stride_y + x * g.stride_x;
  for (I c = c_begin; c < g.channels; c += c_step) {
    dst[c * g.stride_c] = Scalar<D>::store(sum_windows<D>(dy + c * taps, w));
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

// Forward of images (and single-channel tokens): thread `thread` of the `threads` along output row `row`
// writes its features thread, thread + threads, ... (consecutive threads, consecutive features: coalesced
// stores, and reads along the taps kj, which are consecutive in an image row). `start` is
// DigitCursor(thread, threads, KH, KW) over (c, ki, kj), built once per thread instead of once per row.
template <typename T, typename I>
T2T_HD void forward_row(const T* x, T* y, const Geometry<I>& g, I row, const DigitCursor<I>& start, I thread,
                        I threads) {
  I b, oh, ow;
  split_row(g, row, b, oh, ow);
  const T* image = x + b * g.stride_b;
  T* out = y + row * features(g);
  DigitCursor<I> cursor = start;
  for (I f = thread; f < features(g); f += threads) {
    const I tap = tap_offset(g, oh, ow, cursor.mid, cursor.lo);
    out[f] = tap < 0 ? T(0) : image[cursor.hi * g.stride_c + tap];
    cursor.advance(g.kernel_h, g.kernel_w);
  }
}

// ------------------------------------------------------------ staged forward of token input (channels inner)
// With channels contiguous in the input, forward_row's consecutive features (c, ki, kj) lie KH*KW taps apart,
// a warp's 32 reads C elements from each other. The staged forward instead gives each block tiles of the
// output (whole rows, or one row's chunk of channels; contiguous in y either way) in three phases, separated
// by __syncthreads:
//   0. the tile's source offsets per (row, tap) into a table in shared memory (the only divisions);
//   1. loads along the channels of each tap, one 32-bit word per thread (two 16-bit channels, one float; a
//      float64 takes 64 bits): a warp reads 128 (256) contiguous bytes. Each element goes to the stage (shared
//      memory) at its place in the output order (c, ki, kj), so thread i + 1 writes K = KH*KW words after
//      thread i: for an odd K (T2T's 9) the warp's stores hit 32 distinct banks. Wider loads would put a
//      thread's elements K words apart in the same bank (4-way conflicts for four floats and K = 9).
//   2. the stage, now in output order, to y in 16-byte vectors where y and the tile starts allow.

// Tiles and vector widths of one staged launch, chosen on the host (staged_plan) and passed to the kernel.
template <typename I>
struct StagedPlan {
  I rows_per_tile;      // whole output rows per tile, or 1 when rows are split into channel chunks
  I channels_per_tile;  // C, or the channels of a chunk (a multiple of the granule)
  I chunks;             // channel chunks per row
  I tiles;              // ceil(rows / rows_per_tile) * chunks; 0: the staged forward does not apply
  I table_bytes;        // bytes of the offset table at the start of shared memory (a multiple of 16)
  I stage_bytes;        // bytes of the stage after it
  I granule;            // channels per load: 2 for 16-bit elements loaded in pairs, else 1
  I store_bytes;        // bytes per store: 16, or the element size

  template <typename J>
  StagedPlan<J> as() const {
    return {J(rows_per_tile), J(channels_per_tile), J(chunks),      J(tiles),
            J(table_bytes),   J(stage_bytes),       J(granule),     J(store_bytes)};
  }
};

// Tile `index` of a plan: output rows row0 .. row0 + rows - 1, channels c0 .. c0 + channels - 1.
template <typename I>
struct StagedTile {
  I row0, rows, c0, channels;

  T2T_HD StagedTile(const Geometry<I>& g, const StagedPlan<I>& p, I index) {
    const I row_tile = index / p.chunks;
    c0 = (index - row_tile * p.chunks) * p.channels_per_tile;
    channels = g.channels - c0 < p.channels_per_tile ? g.channels - c0 : p.channels_per_tile;
    row0 = row_tile * p.rows_per_tile;
    rows = output_rows(g) - row0 < p.rows_per_tile ? output_rows(g) - row0 : p.rows_per_tile;
  }
  // The tile's part of y, rows x (channels*KH*KW) elements, starts here and is contiguous.
  T2T_HD I out_offset(const Geometry<I>& g) const { return row0 * features(g) + c0 * window_elems(g); }
  T2T_HD I out_elems(const Geometry<I>& g) const { return rows * channels * window_elems(g); }
};

// Phase 0, one thread: table[r*K + t] = offset in x of channel 0 of tap t of the tile's row r, or -1 when the
// tap lies in the zero padding.
template <typename I>
T2T_HD void staged_table(const Geometry<I>& g, const StagedTile<I>& tile, I* table, I thread, I threads) {
  const I taps = window_elems(g);
  for (I e = thread; e < tile.rows * taps; e += threads) {
    const I r = e / taps;
    const I t = e - r * taps;
    const I ki = t / g.kernel_w;
    I b, oh, ow;
    split_row(g, tile.row0 + r, b, oh, ow);
    const I offset = tap_offset(g, oh, ow, ki, t - ki * g.kernel_w);
    table[e] = offset < 0 ? I(-1) : b * g.stride_b + offset;
  }
}

// Raw loads and stores of the staged forward: plain dereferences on the GPU, memcpy on the host (the
// emulation reads 16-bit elements as 32-bit words).
#ifdef __CUDACC__
using Bits128 = uint4;
#else
struct alignas(16) Bits128 {
  uint32_t x, y, z, w;
};
#endif
template <int Bytes>
using Bits = std::conditional_t<Bytes == 16, Bits128,
                                std::conditional_t<Bytes == 8, uint64_t,
                                                   std::conditional_t<Bytes == 4, uint32_t, uint16_t>>>;

template <typename V>
T2T_HD V load_bits(const void* p) {
#ifdef __CUDA_ARCH__
  return *static_cast<const V*>(p);
#else
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <typename V>
T2T_HD void store_bits(void* p, const V& v) {
#ifdef __CUDA_ARCH__
  *static_cast<V*>(p) = v;
#else
  memcpy(p, &v, sizeof(V));
#endif
}

constexpr int kStagedLoadsInFlight = 4;  // loads a thread issues before storing any (latency hiding)

// Phase 1, one thread: the tile's loads (G channels of one tap of one row) thread, thread + threads, ...,
// numbered (row, tap, channel) with channels fastest, so consecutive threads read consecutive addresses. The
// element of channel c (relative to c0) of tap t of row r goes to stage[(r*channels + c)*K + t].
template <int G, typename T, typename I>
T2T_HD void staged_load(const T* x, const Geometry<I>& g, const StagedTile<I>& tile, const I* table, T* stage,
                        I thread, I threads) {
  using Word = Bits<int(G * sizeof(T))>;
  const I taps = window_elems(g);
  const I granules = tile.channels / G;  // loads per (row, tap)
  const I source_step = G * g.stride_c;  // one granule along the channels of x
  DigitCursor<I> cursor(thread, threads, taps, granules);  // (r, t, granule)
  const T* source = x + tile.c0 * g.stride_c;
  while (cursor.hi < tile.rows) {
    Word words[kStagedLoadsInFlight];
    I places[kStagedLoadsInFlight];  // -1: past the tile
    T2T_UNROLL
    for (int k = 0; k < kStagedLoadsInFlight; ++k) {
      places[k] = -1;
      if (cursor.hi < tile.rows) {
        const I offset = table[cursor.hi * taps + cursor.mid];
        words[k] = offset < 0 ? Word(0) : load_bits<Word>(source + offset + cursor.lo * source_step);
        places[k] = (cursor.hi * tile.channels + cursor.lo * G) * taps + cursor.mid;
        cursor.advance(taps, granules);
      }
    }
    T2T_UNROLL
    for (int k = 0; k < kStagedLoadsInFlight; ++k) {
      if (places[k] < 0) continue;
      if constexpr (G == 1) {
        stage[places[k]] = words[k];
      } else {  // little-endian on both sides: channel c0 + 2i is the low half
        stage[places[k]] = T(words[k] & 0xffffu);
        stage[places[k] + taps] = T(words[k] >> 16);
      }
    }
  }
}

// Phase 2, one thread: the stage to y in V-sized pieces (the tile's part of y is contiguous), then the tail.
template <typename V, typename T, typename I>
T2T_HD void staged_store(T* y, const Geometry<I>& g, const StagedTile<I>& tile, const T* stage, I thread,
                         I threads) {
  constexpr I per = I(sizeof(V) / sizeof(T));
  T* out = y + tile.out_offset(g);
  const I elems = tile.out_elems(g);
  const I vectors = elems / per;
  for (I i = thread; i < vectors; i += threads) store_bits<V>(out + i * per, load_bits<V>(stage + i * per));
  for (I e = vectors * per + thread; e < elems; e += threads) out[e] = stage[e];
}

constexpr int64_t kStageBytes = 12 * 1024;      // stage per block: 8 blocks of 256 threads fit an SM's 228 KB
constexpr int64_t kMaxTableEntries = 1024;       // (row, tap) offsets per tile
constexpr int64_t kMaxSharedBytes = 48 * 1024;   // dynamic shared memory without an opt-in

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a launch over `work` items (tiles, rows of blocks): at least 1, grid-stride beyond 2^30.
inline int64_t launch_blocks(int64_t work) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return work < 1 ? 1 : work > kMaxBlocks ? kMaxBlocks : work;
}

// The staged forward's plan for input x and output y (addresses: their alignment picks the vector widths), or
// a plan with tiles == 0 when it does not apply: input not channels-inner, or windows of more than
// kMaxTableEntries taps (forward_row's kernel runs then).
inline StagedPlan<int64_t> staged_plan(const UnfoldGeometry& g, int64_t elem, uintptr_t x, uintptr_t y,
                                       int64_t index_bytes) {
  StagedPlan<int64_t> p{};
  const int64_t taps = window_elems(g);
  const int64_t rows = output_rows(g);
  if (!channels_inner(g) || taps > kMaxTableEntries || rows == 0) return p;
  const bool pairs = elem == 2 && g.stride_c == 1 && g.channels % 2 == 0 && x % 4 == 0 && g.stride_b % 2 == 0 &&
                     g.stride_y % 2 == 0 && g.stride_x % 2 == 0;  // every tap's channel 0 on a 32-bit word
  p.granule = pairs ? 2 : 1;
  const int64_t row_bytes = features(g) * elem;
  if (row_bytes <= kStageBytes) {
    p.channels_per_tile = g.channels;
    p.rows_per_tile = kStageBytes / row_bytes;
    if (p.rows_per_tile > kMaxTableEntries / taps) p.rows_per_tile = kMaxTableEntries / taps;
    if (p.rows_per_tile > rows) p.rows_per_tile = rows;
  } else {
    p.rows_per_tile = 1;
    p.channels_per_tile = kStageBytes / (taps * elem) / p.granule * p.granule;
    if (p.channels_per_tile < p.granule) p.channels_per_tile = p.granule;
  }
  p.chunks = ceil_div(g.channels, p.channels_per_tile);
  p.tiles = ceil_div(rows, p.rows_per_tile) * p.chunks;
  p.table_bytes = ceil_div(p.rows_per_tile * taps * index_bytes, 16) * 16;
  p.stage_bytes = p.rows_per_tile * p.channels_per_tile * taps * elem;
  // Every tile starts at a multiple of the row or of the chunk in y: 16-byte stores when both are too.
  const bool wide = y % 16 == 0 && row_bytes % 16 == 0 && (p.channels_per_tile * taps * elem) % 16 == 0;
  p.store_bytes = wide ? 16 : elem;
  if (p.table_bytes + p.stage_bytes > kMaxSharedBytes) p.tiles = 0;  // a chunk of one channel is too big
  return p;
}

// f(granule, access bytes), both std::integral_constant<int, ...>: the kernel variant of a staged plan of T
// elements (granule 2: pairs of 16-bit elements; access bytes 16: 16-byte global accesses, else one element).
template <typename T, typename F>
void dispatch_staged(int granule, int access_bytes, F&& f) {
  using G1 = std::integral_constant<int, 1>;
  using G2 = std::integral_constant<int, 2>;
  using Wide = std::integral_constant<int, 16>;
  using Narrow = std::integral_constant<int, int(sizeof(T))>;
  if constexpr (sizeof(T) == 2) {
    if (granule == 2) return access_bytes == 16 ? f(G2{}, Wide{}) : f(G2{}, Narrow{});
  }
  return access_bytes == 16 ? f(G1{}, Wide{}) : f(G1{}, Narrow{});
}

// ------------------------------------------------------------------------------- staged backward
// Each dy element feeds one dx element, but a window's taps go to KH*KW different pixels: gathering straight
// from dy (backward_pixel) makes a warp read addresses KH*KW elements apart (token input) or F apart (images).
// The staged backward gives each block tiles of dx (a rectangle of pixels of one image, a chunk of channels)
// in two phases, separated by __syncthreads:
//   1. the rows and columns of windows covering the tile into a table (two entries per tile row and column:
//      the only divisions), and the tile's channel chunk of each of those windows, contiguous in dy, into the
//      stage in shared memory: 16-byte loads where dy and the chunks allow, consecutive threads consecutive
//      addresses;
//   2. every (pixel, channel) of the tile: sum_windows over the stage, the same taps in the same order as
//      from dy (bit-identical), then the store, along the channels for token input (two 16-bit channels per
//      32-bit word where dx allows) or along x for images. Reading the stage, consecutive channels are KH*KW
//      elements apart: odd for T2T's 3x3 windows, so 32-bit elements hit 32 distinct banks.
// Windows covering pixels on both sides of a tile edge are loaded by both tiles; backward_plan picks the tile
// that moves the fewest sectors within the stage budget.

// Tiles and vector widths of one staged backward launch, chosen on the host (backward_plan).
template <typename I>
struct BackwardPlan {
  I tile_h, tile_w;      // pixels per tile along y and x
  I channels_per_tile;   // C, or the channels of a chunk (a multiple of the granule)
  I tiles_y, tiles_x, chunks;
  I tiles;               // batch * tiles_y * tiles_x * chunks; 0: the staged backward does not apply
  I table_bytes;         // bytes of the window table at the start of shared memory (a multiple of 16)
  I stage_bytes;         // bytes of the stage after it
  I granule;             // channels per thread of phase 2: 2 for 16-bit pairs stored as one word, else 1
  I load_bytes;          // bytes per load of phase 1: 16, or the element size

  template <typename J>
  BackwardPlan<J> as() const {
    return {J(tile_h), J(tile_w),      J(channels_per_tile), J(tiles_y),   J(tiles_x),
            J(chunks), J(tiles),       J(table_bytes),       J(stage_bytes), J(granule), J(load_bytes)};
  }
};

// Tile `index` of a plan: pixels (b, y0 .. y0 + rows - 1, x0 .. x0 + cols - 1), channels c0 .. c0 + channels - 1,
// and the windows covering them: (oh0 .. oh0 + win_rows - 1, ow0 .. ow0 + win_cols - 1), none when either is 0.
template <typename I>
struct BackwardTile {
  I b, y0, rows, x0, cols, c0, channels;
  I oh0, win_rows, ow0, win_cols;

  T2T_HD BackwardTile(const Geometry<I>& g, const BackwardPlan<I>& p, I index) {
    I rest = index / p.chunks;
    c0 = (index - rest * p.chunks) * p.channels_per_tile;
    channels = g.channels - c0 < p.channels_per_tile ? g.channels - c0 : p.channels_per_tile;
    I tile_y, tile_x;
    split_digits(rest, p.tiles_y, p.tiles_x, b, tile_y, tile_x);
    y0 = tile_y * p.tile_h;
    x0 = tile_x * p.tile_w;
    rows = g.height - y0 < p.tile_h ? g.height - y0 : p.tile_h;
    cols = g.width - x0 < p.tile_w ? g.width - x0 : p.tile_w;
    // covering_windows' bounds are monotone in the pixel: the tile's windows run from its first pixel's first
    // to its last pixel's last.
    I unused, last;
    covering_windows(y0, g.kernel_h, g.stride_h, g.pad_h, g.out_h, oh0, unused);
    covering_windows(y0 + rows - 1, g.kernel_h, g.stride_h, g.pad_h, g.out_h, unused, last);
    win_rows = last - oh0 + 1;
    covering_windows(x0, g.kernel_w, g.stride_w, g.pad_w, g.out_w, ow0, unused);
    covering_windows(x0 + cols - 1, g.kernel_w, g.stride_w, g.pad_w, g.out_w, unused, last);
    win_cols = last - ow0 + 1;
    if (win_rows <= 0 || win_cols <= 0) win_rows = win_cols = 0;
  }
  // Stage elements per window: the chunk's channels of each tap.
  T2T_HD I window_len(const Geometry<I>& g) const { return channels * window_elems(g); }
};

// Phase 1, table part, one thread: per tile row r, table[2r] = the stage offset of the first window covering it
// plus its tap row ki*KW, table[2r + 1] = how many windows cover it; then the same per tile column at
// table[2*rows_max + 2c ...] (stage offset j*window_len + kj).
template <typename I>
T2T_HD void backward_table(const Geometry<I>& g, const BackwardPlan<I>& p, const BackwardTile<I>& tile, I* table,
                           I thread, I threads) {
  const I len = tile.window_len(g);
  for (I e = thread; e < tile.rows + tile.cols; e += threads) {
    const bool is_row = e < tile.rows;
    const I i = is_row ? tile.y0 + e : tile.x0 + e - tile.rows;  // input row or column
    I first, last, offset;
    if (is_row) {
      covering_windows(i, g.kernel_h, g.stride_h, g.pad_h, g.out_h, first, last);
      offset = (first - tile.oh0) * tile.win_cols * len + (i + g.pad_h - first * g.stride_h) * g.kernel_w;
    } else {
      covering_windows(i, g.kernel_w, g.stride_w, g.pad_w, g.out_w, first, last);
      offset = (first - tile.ow0) * len + i + g.pad_w - first * g.stride_w;
    }
    I* entry = table + 2 * (is_row ? e : p.tile_h + e - tile.rows);
    entry[0] = last >= first ? offset : I(0);
    entry[1] = last >= first ? last - first + 1 : I(0);
  }
}

// Phase 1, load part, one thread: loads thread, thread + threads, ... of V bytes, numbered (window row, window,
// vector) with vectors fastest; window (i, j)'s chunk goes to stage[(i*win_cols + j)*window_len ...].
template <typename V, typename T, typename I>
T2T_HD void backward_stage_load(const T* dy, const Geometry<I>& g, const BackwardTile<I>& tile, T* stage, I thread,
                                I threads) {
  if (tile.win_rows == 0) return;
  constexpr I per = I(sizeof(V) / sizeof(T));
  const I vectors = tile.window_len(g) / per;  // whole: backward_plan picks 16 bytes only then
  const I row_features = features(g);
  const T* source =
      dy + ((tile.b * g.out_h + tile.oh0) * g.out_w + tile.ow0) * row_features + tile.c0 * window_elems(g);
  DigitCursor<I> cursor(thread, threads, tile.win_cols, vectors);  // (i, j, vector)
  while (cursor.hi < tile.win_rows) {
    V words[kStagedLoadsInFlight];
    I places[kStagedLoadsInFlight];  // -1: past the tile
    T2T_UNROLL
    for (int k = 0; k < kStagedLoadsInFlight; ++k) {
      places[k] = -1;
      if (cursor.hi < tile.win_rows) {
        words[k] = load_bits<V>(source + (cursor.hi * g.out_w + cursor.mid) * row_features + cursor.lo * per);
        places[k] = ((cursor.hi * tile.win_cols + cursor.mid) * vectors + cursor.lo) * per;
        cursor.advance(tile.win_cols, vectors);
      }
    }
    T2T_UNROLL
    for (int k = 0; k < kStagedLoadsInFlight; ++k) {
      if (places[k] >= 0) store_bits<V>(stage + places[k], words[k]);
    }
  }
}

// Phase 2, one thread: the tile's dx elements thread, thread + threads, ..., numbered (y, x, channel granule)
// for token input (stores along the channels) and (channel, y, x) for images (stores along x).
template <int D, int G, typename I>
T2T_HD void backward_stage_sum(const Geometry<I>& g, const BackwardPlan<I>& p, const BackwardTile<I>& tile,
                               const I* table, const typename Scalar<D>::storage* stage,
                               typename Scalar<D>::storage* dx, I thread, I threads) {
  using S = Scalar<D>;
  const I taps = window_elems(g);
  const I len = tile.window_len(g);
  const I* columns = table + 2 * p.tile_h;
  typename S::storage* image = dx + tile.b * g.stride_b;
  const bool inner = channels_inner(g);
  // (outer, middle, inner) = (y, x, granule) or (c, y, x)
  const I mid_n = inner ? tile.cols : tile.rows;
  const I lo_n = inner ? tile.channels / G : tile.cols;
  const I hi_n = inner ? tile.rows : tile.channels;
  for (DigitCursor<I> cursor(thread, threads, mid_n, lo_n); cursor.hi < hi_n; cursor.advance(mid_n, lo_n)) {
    const I r = inner ? cursor.hi : cursor.mid;
    const I col = inner ? cursor.mid : cursor.lo;
    const I c = inner ? cursor.lo * G : cursor.hi;
    const PixelWindows<I> w(g, table[2 * r + 1], columns[2 * col + 1], table[2 * r] + columns[2 * col], len,
                            tile.win_cols);
    typename S::storage* dst =
        image + (tile.y0 + r) * g.stride_y + (tile.x0 + col) * g.stride_x + (tile.c0 + c) * g.stride_c;
    if constexpr (G == 1) {
      *dst = S::store(sum_windows<D>(stage + c * taps, w));
    } else {  // little-endian: channel c is the low half
      const uint32_t low = S::store(sum_windows<D>(stage + c * taps, w));
      const uint32_t high = S::store(sum_windows<D>(stage + (c + 1) * taps, w));
      store_bits<uint32_t>(dst, low | (high << 16));
    }
  }
}

constexpr int64_t kMaxTileSide = 64;  // pixels per tile along y or x that backward_plan considers

// Sectors (32 bytes) a run of `bytes` contiguous bytes touches, counting one more when it is not whole
// sectors (its start is not known here).
inline int64_t run_sectors(int64_t bytes) { return ceil_div(bytes, 32) + (bytes % 32 != 0 ? 1 : 0); }

// Windows loaded along one axis (input size n, tiles of t) over all tiles: each tile loads the windows
// covering its pixels.
inline int64_t windows_loaded(int64_t n, int64_t t, int64_t kernel, int64_t stride, int64_t pad, int64_t out) {
  int64_t total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += t) {
    int64_t first, last, unused;
    covering_windows(i0, kernel, stride, pad, out, first, unused);
    covering_windows(i0 + t - 1 < n ? i0 + t - 1 : n - 1, kernel, stride, pad, out, unused, last);
    if (last >= first) total += last - first + 1;
  }
  return total;
}

// The staged backward's plan for dy and dx (addresses: their alignment picks the vector widths), or a plan with
// tiles == 0 when even a one-pixel tile of one channel granule does not fit in shared memory (backward_pixel's
// kernels run then). Among tiles of up to kMaxTileSide pixels a side and chunks of C or of a power-of-two
// multiple of the 16-byte chunk, it picks the fewest sectors loaded and stored (estimated from run lengths),
// first within kStageBytes, then within kMaxSharedBytes; tiles that leave threads of a block idle only when
// nothing else fits.
inline BackwardPlan<int64_t> backward_plan(const UnfoldGeometry& g, int64_t elem, uintptr_t dy, uintptr_t dx,
                                           int64_t index_bytes) {
  BackwardPlan<int64_t> p{};
  const int64_t taps = window_elems(g);
  const bool inner = channels_inner(g);
  const bool pairs = inner && elem == 2 && g.stride_c == 1 && g.channels % 2 == 0 && dx % 4 == 0 &&
                     g.stride_b % 2 == 0 && g.stride_y % 2 == 0 && g.stride_x % 2 == 0;  // 32-bit dx words
  const int64_t granule = pairs ? 2 : 1;
  int64_t unit = granule;  // the smallest chunk whose dy run is whole 16-byte vectors
  while (unit < g.channels && (unit * taps * elem) % 16 != 0) unit += granule;
  const int64_t max_h = g.height < kMaxTileSide ? g.height : kMaxTileSide;
  const int64_t max_w = g.width < kMaxTileSide ? g.width : kMaxTileSide;
  std::vector<int64_t> loaded_x(max_w + 1);
  for (int64_t tw = 1; tw <= max_w; ++tw) {
    loaded_x[tw] = windows_loaded(g.width, tw, g.kernel_w, g.stride_w, g.pad_w, g.out_w);
  }
  const int64_t pixels = g.height * g.width;
  for (const int64_t budget : {kStageBytes, kMaxSharedBytes}) {
    bool found = false, found_idle = false;
    int64_t best_cost = 0, best_tiles = 0;
    for (int64_t cc = unit;; cc = cc * 2 < g.channels ? cc * 2 : g.channels) {
      const int64_t chunks = ceil_div(g.channels, cc);
      const int64_t window_bytes = cc * taps * elem;
      const int64_t store_run = inner ? (g.stride_c == 1 ? cc * elem : elem) : 0;
      for (int64_t th = 1; th <= max_h; ++th) {
        int64_t nh = (th + g.kernel_h - 2) / g.stride_h + 1;  // most window rows covering th pixel rows
        nh = nh < g.out_h ? nh : g.out_h;
        const int64_t loaded_y = windows_loaded(g.height, th, g.kernel_h, g.stride_h, g.pad_h, g.out_h);
        for (int64_t tw = 1; tw <= max_w; ++tw) {
          int64_t nw = (tw + g.kernel_w - 2) / g.stride_w + 1;
          nw = nw < g.out_w ? nw : g.out_w;
          const int64_t table_bytes = ceil_div(2 * (th + tw) * index_bytes, 16) * 16;
          if (table_bytes + nh * nw * window_bytes > budget) break;
          const int64_t tiles_y = ceil_div(g.height, th), tiles_x = ceil_div(g.width, tw);
          const int64_t stores = inner ? pixels * run_sectors(store_run) * (g.stride_c == 1 ? 1 : cc)
                                       : g.channels * g.height * tiles_x *
                                             (g.stride_x == 1 ? run_sectors(tw * elem) : tw * run_sectors(elem));
          const int64_t cost = loaded_y * loaded_x[tw] * chunks * run_sectors(window_bytes) + stores * chunks;
          const bool idle = th * tw * cc < kThreadsPerBlock * granule;
          const int64_t tiles = tiles_y * tiles_x * chunks;  // per image
          // Ties go to more tiles: more blocks to spread over the GPU.
          const bool better = !found || (found_idle && !idle) ||
                              (found_idle == idle && (cost < best_cost || (cost == best_cost && tiles > best_tiles)));
          if (!better) continue;
          found = true;
          found_idle = idle;
          best_cost = cost;
          best_tiles = tiles;
          p.tile_h = th;
          p.tile_w = tw;
          p.channels_per_tile = cc;
          p.tiles_y = tiles_y;
          p.tiles_x = tiles_x;
          p.chunks = chunks;
          p.tiles = g.batch * tiles;
          p.table_bytes = table_bytes;
          p.stage_bytes = nh * nw * window_bytes;
        }
      }
      if (cc == g.channels) break;
    }
    if (found) break;
  }
  if (p.tiles == 0) return p;
  p.granule = granule;
  // Every window's chunk starts at a multiple of the row or of the chunk in dy: 16-byte loads when both are.
  const bool wide = dy % 16 == 0 && (features(g) * elem) % 16 == 0 && (p.channels_per_tile * taps * elem) % 16 == 0;
  p.load_bytes = wide ? 16 : elem;
  return p;
}


// Backward without staging (windows too large for shared memory): thread `thread` of the `threads` at input
// pixel b*H*W + y*W + x gathers dx for its channels.
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

// Bytes per element of the dtype code; an unknown code is an std::invalid_argument.
inline int64_t element_size(int dtype) {
  int64_t size = 0;
  dispatch_dtype(dtype, [&](auto d) { size = sizeof(StorageBits<decltype(d)::value>); });
  return size;
}

// ------------------------------------------------------------------------------------------ entry points

#ifndef __CUDACC__
// The OW windows of one window row (b, oh) of the forward, gathered into a contiguous (OW, F) buffer: the CPU
// forward's unit of work, also the first step of the fused soft split + LayerNorm. One per thread (it holds
// the per-tap source pointers); elements are moved as 2-, 4- or 8-byte words, the windows of 3x3 splits of
// channels-last tokens by `kernels`' interleave_taps9.
class WindowRowGather {
 public:
  WindowRowGather(const UnfoldGeometry& g, int64_t element_bytes, const CpuKernels& kernels);
  // out <- the windows of row `group` = b*OH + oh of x (addressed through g's strides).
  void operator()(uintptr_t x, void* out, int64_t group);

 private:
  UnfoldGeometry g_;
  int64_t element_bytes_;
  const CpuKernels& kernels_;
  std::vector<const void*> taps_;
  std::vector<uint8_t> zeros_;  // what padding taps read in the channels-inner loop
};
#endif

// Every entry point trusts its caller (bindings.cpp, which checks the geometry against the buffers' extents)
// for valid addresses and a geometry whose reach stays inside them.
// Forward: y (B, L, F) contiguous from x (strides in g). Copies elements bit for bit (padding = +0).
// The CPU kernels run on `threads` OpenMP threads (fewer than 1 means 1); the forward's 3x3 windows of
// channels-last tokens with the vectorised kernels of `isa`.
void restructurize_unfold_forward_cpu(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int threads,
                                      Isa isa);
// Backward: dx (strides in g, not overlapping) from dy (B, L, F) contiguous.
void restructurize_unfold_backward_cpu(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype,
                                       int threads);
// The CUDA kernels run serially on the CPU, block by block over the launch's grid with its threads per block
// and index type (index_bits 32 or 64; 0 picks as the CUDA path does); shared memory is a host array, and
// each phase between two __syncthreads runs for all of a block's threads before the next one starts.
void restructurize_unfold_forward_emulated(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype,
                                           int index_bits);
void restructurize_unfold_backward_emulated(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype,
                                            int index_bits);
#ifdef T2T_WITH_CUDA
// Same on the GPU: one launch over the whole batch on `stream` (a cudaStream_t as an integer) of `device`.
// Throws std::runtime_error on a CUDA error.
void restructurize_unfold_forward_cuda(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int device,
                                       uintptr_t stream);
void restructurize_unfold_backward_cuda(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype, int device,
                                        uintptr_t stream);
#endif

}  // namespace t2t
