// CPU kernels of the fused re-structurize + unfold (OpenMP over output rows, pixel rows or dx planes).
#include <algorithm>
#include <cstring>
#include <vector>

#include "restructurize_unfold.h"

namespace t2t {
namespace {

// The forward only moves elements, so it works on their bits: 2-, 4- and 8-byte words.
// The OW windows of window row `group` (= b*OH + oh), written to out as (OW, F). `tap` holds KH*KW pointers,
// `zeros` is what padding taps read in the channels-inner loop (channel c at zeros[c * stride_c]).
template <typename T>
void gather_window_row(const T* x, T* out, const UnfoldGeometry& g, int64_t group, const T** tap, const T* zeros,
                       const CpuKernels& kernels) {
  const int64_t taps = window_elems(g);
  const int64_t row_features = features(g);
  // Token input has unit channel stride: loop over taps, channels innermost (contiguous reads).
  // Images have unit x stride: loop over channels, taps innermost (contiguous writes, runs of KW reads).
  const bool inner = channels_inner(g);
  const int64_t sc = g.stride_c;
  int64_t b, oh, ow;
  split_row(g, group * g.out_w, b, oh, ow);  // ow = 0; one division per window row, not per window
  int64_t ki_begin, ki_end;
  taps_inside(oh, g.kernel_h, g.stride_h, g.pad_h, g.height, ki_begin, ki_end);
  const bool rows_inside = ki_begin == 0 && ki_end == g.kernel_h;  // no window row of this oh is padding
  const T* image = x + b * g.stride_b;
  for (; ow < g.out_w; ++ow, out += row_features) {
    if (inner) {
      // One source pointer per tap (padding taps read a zero row), then the row is written in order:
      // y[c*taps + t] = tap t's channel c.
      for (int64_t ki = 0, t = 0; ki < g.kernel_h; ++ki) {
        for (int64_t kj = 0; kj < g.kernel_w; ++kj, ++t) {
          const int64_t offset = tap_offset(g, oh, ow, ki, kj);
          tap[t] = offset < 0 ? zeros : image + offset;
        }
      }
      if (taps == 9 && sc == 1) {  // T2T's k3 soft splits
        kernels.interleave_taps9(reinterpret_cast<const void* const*>(tap), out, g.channels, sizeof(T));
      } else {
        for (int64_t c = 0, f = 0; c < g.channels; ++c) {
          for (int64_t t = 0; t < taps; ++t, ++f) out[f] = tap[t][c * sc];
        }
      }
      continue;
    }
    // Along a window row the taps are consecutive input columns: zeros, a run of copies, zeros.
    int64_t kj_begin, kj_end;
    taps_inside(ow, g.kernel_w, g.stride_w, g.pad_w, g.width, kj_begin, kj_end);
    const int64_t sx = g.stride_x;
    if (sx == 1 && g.kernel_w == 7 && kj_end - kj_begin == 7 && rows_inside) {
      // A window of the k7 image split wholly inside the image (~93 % of them at 224 px): the row is
      // KH*C runs of 7 consecutive pixels, copied without per-tap bounds (fixed-size, inlined copies).
      const T* src = image + tap_offset(g, oh, ow, int64_t(0), int64_t(0));
      T* dst = out;
      for (int64_t c = 0; c < g.channels; ++c) {
        const T* run = src + c * sc;
        for (int64_t ki = 0; ki < g.kernel_h; ++ki, run += g.stride_y, dst += 7) {
          std::memcpy(dst, run, 7 * sizeof(T));
        }
      }
      continue;
    }
    for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
      // -1 when this window row lies in the padding
      const int64_t offset = kj_begin < kj_end ? tap_offset(g, oh, ow, ki, kj_begin) : -1;
      for (int64_t c = 0; c < g.channels; ++c) {
        T* dst = out + (c * g.kernel_h + ki) * g.kernel_w;
        if (offset < 0) {
          for (int64_t kj = 0; kj < g.kernel_w; ++kj) dst[kj] = 0;
          continue;
        }
        const T* src = image + c * g.stride_c + offset;  // the input column of tap kj_begin
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

template <typename T>
void forward_rows(const T* x, T* y, const UnfoldGeometry& g, int threads, const CpuKernels& kernels) {
  const int64_t row_groups = g.batch * g.out_h;
  const int64_t group_elems = g.out_w * features(g);
#pragma omp parallel num_threads(threads)
  {
    WindowRowGather gather(g, sizeof(T), kernels);
#pragma omp for schedule(static)
    for (int64_t group = 0; group < row_groups; ++group) {
      gather(reinterpret_cast<uintptr_t>(x), y + group * group_elems, group);
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

// Other layouts (NCHW images, one channel): one (b, c) plane of dx per task. Its windows are added into a
// plane accumulator in (oh, ow) order, reading dy front to back; every element thus sums its taps in the
// order of gather_pixel_grad (the CUDA kernel): the same deterministic gather, without atomics, since no
// two threads share a plane.
template <int D>
void backward_planes(const typename Scalar<D>::storage* dy, typename Scalar<D>::storage* dx,
                     const UnfoldGeometry& g, int threads) {
  using S = Scalar<D>;
  using A = typename S::acc;
  const int64_t planes = g.batch * g.channels;
  const int64_t row_features = features(g);
  const int64_t taps = window_elems(g);
  // Per window column ow: the taps kj that fall inside the image, [kj_begin, kj_end).
  std::vector<int64_t> columns(2 * g.out_w);
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    taps_inside(ow, g.kernel_w, g.stride_w, g.pad_w, g.width, columns[2 * ow], columns[2 * ow + 1]);
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<A> acc(g.height * g.width);
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t b = plane / g.channels;
      const int64_t c = plane % g.channels;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t y0 = oh * g.stride_h - g.pad_h;  // input row of tap ki = 0
        int64_t ki_begin, ki_end;
        taps_inside(oh, g.kernel_h, g.stride_h, g.pad_h, g.height, ki_begin, ki_end);
        const auto* window = dy + (b * g.out_h + oh) * g.out_w * row_features + c * taps;
        for (int64_t ow = 0; ow < g.out_w; ++ow, window += row_features) {
          const int64_t x0 = ow * g.stride_w - g.pad_w;  // input column of tap kj = 0
          const int64_t kj_begin = columns[2 * ow], kj_end = columns[2 * ow + 1];
          for (int64_t ki = ki_begin; ki < ki_end; ++ki) {
            A* dst = acc.data() + (y0 + ki) * g.width + x0;
            const auto* src = window + ki * g.kernel_w;
            for (int64_t kj = kj_begin; kj < kj_end; ++kj) dst[kj] += S::load(src[kj]);
          }
        }
      }
      auto* out = dx + b * g.stride_b + c * g.stride_c;
      for (int64_t y = 0; y < g.height; ++y) {
        for (int64_t x = 0; x < g.width; ++x) out[y * g.stride_y + x * g.stride_x] = S::store(acc[y * g.width + x]);
      }
    }
  }
}

template <int D>
void backward_typed(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int threads) {
  using T = typename Scalar<D>::storage;
  const T* grad_out = reinterpret_cast<const T*>(dy);
  T* grad_in = reinterpret_cast<T*>(dx);
  if (channels_inner(g)) {
    backward_channels_last<D>(grad_out, grad_in, g, threads);
  } else {
    backward_planes<D>(grad_out, grad_in, g, threads);
  }
}

}  // namespace

WindowRowGather::WindowRowGather(const UnfoldGeometry& g, int64_t element_bytes, const CpuKernels& kernels)
    : g_(g),
      element_bytes_(element_bytes),
      kernels_(kernels),
      taps_(window_elems(g)),
      zeros_(channels_inner(g) ? ((g.channels - 1) * g.stride_c + 1) * element_bytes : 0, 0) {}

void WindowRowGather::operator()(uintptr_t x, void* out, int64_t group) {
  const void** tap = taps_.data();
  const void* zeros = zeros_.data();
  switch (element_bytes_) {
    case 2:
      return gather_window_row(reinterpret_cast<const uint16_t*>(x), static_cast<uint16_t*>(out), g_, group,
                               reinterpret_cast<const uint16_t**>(tap), static_cast<const uint16_t*>(zeros),
                               kernels_);
    case 4:
      return gather_window_row(reinterpret_cast<const uint32_t*>(x), static_cast<uint32_t*>(out), g_, group,
                               reinterpret_cast<const uint32_t**>(tap), static_cast<const uint32_t*>(zeros),
                               kernels_);
    default:
      return gather_window_row(reinterpret_cast<const uint64_t*>(x), static_cast<uint64_t*>(out), g_, group,
                               reinterpret_cast<const uint64_t**>(tap), static_cast<const uint64_t*>(zeros),
                               kernels_);
  }
}

void restructurize_unfold_forward_cpu(uintptr_t x, uintptr_t y, const UnfoldGeometry& g, int dtype, int threads,
                                      Isa isa) {
  threads = threads < 1 ? 1 : threads;
  const CpuKernels& kernels = cpu_kernels(isa);
  dispatch_dtype(dtype, [&](auto d) {
    using T = StorageBits<decltype(d)::value>;
    forward_rows(reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), g, threads, kernels);
  });
}

void restructurize_unfold_backward_cpu(uintptr_t dy, uintptr_t dx, const UnfoldGeometry& g, int dtype,
                                       int threads) {
  threads = threads < 1 ? 1 : threads;
  dispatch_dtype(dtype, [&](auto d) { backward_typed<decltype(d)::value>(dy, dx, g, threads); });
}

}  // namespace t2t
