// CPU kernels of the fused re-structurize + unfold (OpenMP over output / input rows).
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "restructurize_unfold.h"

namespace t2t {
namespace {

// The forward only moves elements, so it works on their bits: 2-, 4- and 8-byte words.
template <typename T>
void forward_rows(const T* x, T* y, const UnfoldGeometry& g, int threads) {
  const int64_t taps = window_elems(g);
  const int64_t row_features = features(g);
  // Token input has unit channel stride: loop over taps, channels innermost (contiguous reads).
  // Images have unit x stride: loop over channels, taps innermost (contiguous writes, runs of KW reads).
  const bool channels_inner = g.stride_c < g.stride_x;
  const int64_t row_groups = g.batch * g.out_h;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> tap(taps);
#pragma omp for schedule(static)
    for (int64_t group = 0; group < row_groups; ++group) {
      int64_t b, oh, ow;
      split_row(g, group * g.out_w, b, oh, ow);  // ow = 0; one division per window row, not per window
      for (int64_t row = group * g.out_w; ow < g.out_w; ++row, ++ow) {
        const T* image = x + b * g.stride_b;
        T* out = y + row * row_features;
        if (channels_inner) {
          for (int64_t ki = 0, t = 0; ki < g.kernel_h; ++ki) {
            for (int64_t kj = 0; kj < g.kernel_w; ++kj, ++t) tap[t] = tap_offset(g, oh, ow, ki, kj);
          }
          const int64_t sc = g.stride_c;
          for (int64_t t = 0; t < taps; ++t) {
            T* dst = out + t;
            if (tap[t] < 0) {
              for (int64_t c = 0; c < g.channels; ++c) dst[c * taps] = 0;
            } else if (sc == 1) {
              const T* src = image + tap[t];
              for (int64_t c = 0; c < g.channels; ++c) dst[c * taps] = src[c];
            } else {
              const T* src = image + tap[t];
              for (int64_t c = 0; c < g.channels; ++c) dst[c * taps] = src[c * sc];
            }
          }
        } else {
          // Along a window row the taps are consecutive input columns: zeros, a run of copies, zeros.
          const int64_t ix0 = ow * g.stride_w - g.pad_w;
          const int64_t kj_begin = ix0 < 0 ? -ix0 : 0;
          const int64_t kj_end = g.width - ix0 < g.kernel_w ? g.width - ix0 : g.kernel_w;
          const int64_t sx = g.stride_x;
          for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
            // -1 when this window row lies in the padding
            const int64_t offset = kj_begin < kj_end ? tap_offset(g, oh, ow, ki, kj_begin) : -1;
            for (int64_t c = 0; c < g.channels; ++c) {
              T* dst = out + (c * g.kernel_h + ki) * g.kernel_w;
              if (offset < 0) {
                for (int64_t kj = 0; kj < g.kernel_w; ++kj) dst[kj] = 0;
                continue;
              }
              const T* src = image + c * g.stride_c + offset;  // input column ix0 + kj_begin
              T* run = dst + kj_begin;
              const int64_t length = kj_end - kj_begin;
              for (int64_t kj = 0; kj < kj_begin; ++kj) dst[kj] = 0;
              if (sx == 1 && length == 7) {  // whole window rows of the k7 image split: an inlined copy
                std::memcpy(run, src, 7 * sizeof(T));
              } else if (sx == 1) {
                for (int64_t j = 0; j < length; ++j) run[j] = src[j];
              } else {
                for (int64_t j = 0; j < length; ++j) run[j] = src[j * sx];
              }
              for (int64_t kj = kj_end; kj < g.kernel_w; ++kj) dst[kj] = 0;
            }
          }
        }
      }
    }
  }
}

// covering_windows of every input column x: (ow0, ow1) at 2x, 2x + 1; the same for every pixel row.
std::vector<int64_t> column_windows(const UnfoldGeometry& g) {
  std::vector<int64_t> table(2 * g.width);
  for (int64_t x = 0; x < g.width; ++x) {
    covering_windows(x, g.kernel_w, g.stride_w, g.pad_w, g.out_w, table[2 * x], table[2 * x + 1]);
  }
  return table;
}

// Sum of the n taps src[j][0] (j ascending, from +0: the order of gather_pixel_grad), channels innermost.
// The common counts of T2T's k3 s2 windows (1, 2, 4) are unrolled.
template <int D>
void sum_taps(const typename Scalar<D>::storage* const* src, int64_t n, int64_t channels, int64_t taps,
              typename Scalar<D>::storage* dst, int64_t dst_stride) {
  using S = Scalar<D>;
  using A = typename S::acc;
  switch (n) {
    case 1:
      for (int64_t c = 0; c < channels; ++c) {
        A sum = 0;
        sum += S::load(src[0][c * taps]);
        dst[c * dst_stride] = S::store(sum);
      }
      return;
    case 2:
      for (int64_t c = 0; c < channels; ++c) {
        A sum = 0;
        sum += S::load(src[0][c * taps]);
        sum += S::load(src[1][c * taps]);
        dst[c * dst_stride] = S::store(sum);
      }
      return;
    case 4:
      for (int64_t c = 0; c < channels; ++c) {
        A sum = 0;
        sum += S::load(src[0][c * taps]);
        sum += S::load(src[1][c * taps]);
        sum += S::load(src[2][c * taps]);
        sum += S::load(src[3][c * taps]);
        dst[c * dst_stride] = S::store(sum);
      }
      return;
    default:
      for (int64_t c = 0; c < channels; ++c) {
        A sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += S::load(src[j][c * taps]);
        dst[c * dst_stride] = S::store(sum);
      }
  }
}

// Channels-last dx (token input): per pixel, list the covering windows' taps (PixelWindows order), then sum
// them channel by channel.
template <int D>
void backward_channels_last(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                            const UnfoldGeometry& g, int threads) {
  using T = typename Scalar<D>::storage;
  const int64_t taps = window_elems(g);
  const int64_t pixel_rows = g.batch * g.height;
  const std::vector<int64_t> columns = column_windows(g);
#pragma omp parallel num_threads(threads)
  {
    std::vector<const T*> sources(taps);
#pragma omp for schedule(static)
    for (int64_t pixel_row = 0; pixel_row < pixel_rows; ++pixel_row) {
      int64_t b, y, x, oh0, oh1;
      split_pixel(g, pixel_row * g.width, b, y, x);
      covering_windows(y, g.kernel_h, g.stride_h, g.pad_h, g.out_h, oh0, oh1);
      for (; x < g.width; ++x) {
        const PixelWindows<int64_t> w(g, b, y, x, oh0, oh1, columns[2 * x], columns[2 * x + 1]);
        int64_t count = 0;
        for (int64_t i = 0, row = w.first; i < w.rows; ++i, row += w.row_step) {
          for (int64_t j = 0, offset = row; j < w.cols; ++j, offset += w.window_step) sources[count++] = dy + offset;
        }
        sum_taps<D>(sources.data(), count, g.channels, taps,
                    dx + b * g.stride_b + y * g.stride_y + x * g.stride_x, g.stride_c);
      }
    }
  }
}

// Other layouts (NCHW images, few channels): gather_pixel_grad per pixel, as the CUDA pixel kernel.
template <int D>
void backward_pixels(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                     const UnfoldGeometry& g, int threads) {
  const int64_t pixel_rows = g.batch * g.height;
  const std::vector<int64_t> columns = column_windows(g);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t pixel_row = 0; pixel_row < pixel_rows; ++pixel_row) {
    int64_t b, y, x, oh0, oh1;
    split_pixel(g, pixel_row * g.width, b, y, x);
    covering_windows(y, g.kernel_h, g.stride_h, g.pad_h, g.out_h, oh0, oh1);
    for (; x < g.width; ++x) {
      const PixelWindows<int64_t> w(g, b, y, x, oh0, oh1, columns[2 * x], columns[2 * x + 1]);
      gather_pixel_grad<D>(g, dy, dx, w, b, y, x, int64_t(0), int64_t(1));
    }
  }
}

template <int D>
void backward_typed(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int threads) {
  using T = typename Scalar<D>::storage;
  const T* grad_out = reinterpret_cast<const T*>(dy);
  T* grad_in = reinterpret_cast<T*>(dx);
  if (g.stride_c == 1 && g.channels > 1) {
    backward_channels_last<D>(grad_out, grad_in, g, threads);
  } else {
    backward_pixels<D>(grad_out, grad_in, g, threads);
  }
}

}  // namespace

void restructurize_unfold_forward_cpu(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int threads) {
  switch (dtype) {
    case kFloat32:
      return forward_rows(reinterpret_cast<const uint32_t*>(x), reinterpret_cast<uint32_t*>(y), g, threads);
    case kFloat16:
    case kBFloat16:
      return forward_rows(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(y), g, threads);
    case kFloat64:
      return forward_rows(reinterpret_cast<const uint64_t*>(x), reinterpret_cast<uint64_t*>(y), g, threads);
    default:
      throw std::invalid_argument("restructurize_unfold: unknown dtype code " + std::to_string(dtype));
  }
}

void restructurize_unfold_backward_cpu(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype,
                                       int threads) {
  switch (dtype) {
    case kFloat32:
      return backward_typed<kFloat32>(dy, dx, g, threads);
    case kFloat16:
      return backward_typed<kFloat16>(dy, dx, g, threads);
    case kBFloat16:
      return backward_typed<kBFloat16>(dy, dx, g, threads);
    case kFloat64:
      return backward_typed<kFloat64>(dy, dx, g, threads);
    default:
      throw std::invalid_argument("restructurize_unfold: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace t2t
