// pybind11 entry points of t2t_fast._C. No torch headers: tensors arrive as addresses and integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "add_layernorm_cpu.h"
#include "attention_cpu.h"
#include "cpu_isa.h"
#include "encoder_cpu.h"
#include "favor_attention_cpu.h"
#include "linear_cpu.h"
#include "restructurize_unfold.h"
#include "soft_split_layernorm_cpu.h"

namespace py = pybind11;


namespace {
using t2t::element_size;

bool compiled_with_cuda() {
#ifdef T2T_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::string> compiled_kernels() {
  std::vector<std::string> names = {"restructurize_unfold_cpu", "soft_split_layernorm_cpu", "favor_attention_cpu",
                                    "attention_cpu", "add_layernorm_cpu", "linear_cpu", "encoder_cpu"};
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

// The ISA of the vectorised CPU kernels from its name ("amx", "avx512", "avx2", "baseline"); a ValueError for an
// unknown name or one this CPU cannot run.
t2t::Isa parse_isa(const std::string& op, const std::string& name) {
  for (t2t::Isa isa : t2t::kIsas) {
    if (name != t2t::isa_name(isa)) continue;
    if (static_cast<int>(isa) > static_cast<int>(t2t::best_cpu_isa())) {
      throw py::value_error(op + ": this CPU cannot run the " + name + " kernels (best: " +
                            t2t::isa_name(t2t::best_cpu_isa()) + ")");
    }
    return isa;
  }
  throw py::value_error(op + ": unknown CPU kernel ISA '" + name + "' (amx, avx512, avx2, baseline)");
}

// restructurize_unfold_forward_cpu with the kernels' ISA by name.
void restructurize_unfold_forward(std::uintptr_t x, std::uintptr_t y, const t2t::UnfoldGeometry& g, int dtype,
                                  int threads, std::string isa) {
  t2t::restructurize_unfold_forward_cpu(x, y, g, dtype, threads, parse_isa("restructurize_unfold", isa));
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (t2t::Isa isa : t2t::kIsas) {
    if (static_cast<int>(isa) <= static_cast<int>(t2t::best_cpu_isa())) names.push_back(t2t::isa_name(isa));
  }
  return names;
}

// The float32/bfloat16 dtype code of a vectorised CPU kernel's tensor.
void check_fast_dtype(const std::string& op, const char* name, int dtype) {
  if (dtype != t2t::kFloat32 && dtype != t2t::kBFloat16) {
    throw py::value_error(op + ": " + name + " must be float32 or bfloat16 (dtype code " + std::to_string(dtype) +
                          ")");
  }
}

// A buffer of `extent` elements of `elem` bytes at `address` holding at least `needed`, aligned to `elem`.
void check_extent(const std::string& op, const char* name, std::uintptr_t address, int64_t extent, int64_t needed,
                  int64_t elem) {
  if (extent < needed || address == 0 || address % elem != 0) {
    throw py::value_error(op + ": " + name + " holds " + std::to_string(extent) + " elements at " +
                          std::to_string(address) + "; needs " + std::to_string(needed) + ", aligned to " +
                          std::to_string(elem) + " bytes");
  }
}

void soft_split_layernorm_forward(std::uintptr_t x, int64_t x_extent, const Quad& sizes, const Pair& kernel,
                                  const Pair& stride, const Pair& padding, const Quad& strides, int x_dtype,
                                  std::uintptr_t weight, std::uintptr_t bias, int64_t params_extent, double eps,
                                  std::uintptr_t y, int64_t y_extent, int y_dtype, std::uintptr_t mean,
                                  std::uintptr_t rstd, int64_t stats_extent, const std::string& isa, int threads) {
  const std::string op = "soft_split_layernorm";
  check_fast_dtype(op, "x", x_dtype);
  check_fast_dtype(op, "y", y_dtype);
  const t2t::UnfoldGeometry g = make_geometry(sizes, kernel, stride, padding, strides);
  const int64_t rows = t2t::output_rows(g);
  check_extent(op, "x", x, x_extent, strided_reach(g), element_size(x_dtype));
  check_extent(op, "y", y, y_extent, unfolded_elems(g), element_size(y_dtype));
  check_extent(op, "weight", weight, params_extent, t2t::features(g), 4);
  check_extent(op, "bias", bias, params_extent, t2t::features(g), 4);
  check_extent(op, "mean", mean, stats_extent, rows, 4);
  check_extent(op, "rstd", rstd, stats_extent, rows, 4);
  const t2t::Isa chosen = parse_isa(op, isa);
  py::gil_scoped_release release;
  t2t::soft_split_layernorm_forward_cpu(x, x_dtype, g, reinterpret_cast<const float*>(weight),
                                        reinterpret_cast<const float*>(bias), static_cast<float>(eps), y, y_dtype,
                                        reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd), chosen,
                                        threads);
}

// One of k, q, v: its address, extent and (batch, token) strides; elements along the width are adjacent.
using Operand = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t>;

// An output (or w_t): its address and extent.
using Buffer = std::pair<std::uintptr_t, int64_t>;

void favor_attention_forward(const Operand& k, const Operand& q, const Operand& v, int dtype, int64_t batch,
                             int64_t tokens, int64_t width, int64_t features, const Buffer& w_t, double log_eps_m,
                             const Buffer& y, const Buffer& s, const Buffer& z, const Buffer& c_k,
                             const std::string& isa, int threads) {
  const std::string op = "favor_attention";
  check_fast_dtype(op, "k, q, v", dtype);
  if (batch <= 0 || tokens <= 0 || width <= 0 || features <= 0) {
    throw py::value_error(op + ": batch, tokens, width and features must be positive");
  }
  const int64_t elem = element_size(dtype);
  auto round_up = [](int64_t n) { return checked_mul((n + 15) / 16, 16); };
  t2t::FavorProblem p{};
  p.dtype = dtype;
  p.batch = batch;
  p.tokens = tokens;
  p.width = width;
  p.features = features;
  p.width_pad = round_up(width);
  p.features_pad = round_up(features);
  const char* names[3] = {"k", "q", "v"};
  const Operand* operands[3] = {&k, &q, &v};
  const void** pointers[3] = {&p.k, &p.q, &p.v};
  int64_t* strides[3][2] = {{&p.k_stride_b, &p.k_stride_t}, {&p.q_stride_b, &p.q_stride_t},
                            {&p.v_stride_b, &p.v_stride_t}};
  for (int i = 0; i < 3; ++i) {
    const auto& [address, extent, stride_b, stride_t] = *operands[i];
    if (stride_b < 0 || stride_t < 0) throw py::value_error(op + ": negative strides");
    const int64_t reach = checked_add(checked_add(checked_mul(batch - 1, stride_b), checked_mul(tokens - 1, stride_t)),
                                      width);
    check_extent(op, names[i], address, extent, reach, elem);
    *pointers[i] = reinterpret_cast<const void*>(address);
    *strides[i][0] = stride_b;
    *strides[i][1] = stride_t;
  }
  check_extent(op, "w_t", w_t.first, w_t.second, checked_mul(width, p.features_pad), 4);
  check_extent(op, "y", y.first, y.second, checked_mul(checked_mul(batch, tokens), width), elem);
  check_extent(op, "s", s.first, s.second, checked_mul(checked_mul(batch, features), width), 4);
  check_extent(op, "z", z.first, z.second, checked_mul(batch, features), 4);
  check_extent(op, "c_k", c_k.first, c_k.second, checked_mul(batch, features), 4);
  p.w_t = reinterpret_cast<const float*>(w_t.first);
  p.log_eps_m = static_cast<float>(log_eps_m);
  p.y = reinterpret_cast<void*>(y.first);
  const t2t::Isa chosen = parse_isa(op, isa);
  py::gil_scoped_release release;
  t2t::favor_attention_forward_cpu(p, reinterpret_cast<float*>(s.first), reinterpret_cast<float*>(z.first),
                                   reinterpret_cast<float*>(c_k.first), chosen, threads);
}

void attention_forward(const Operand& qkv, int dtype, int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                       double scale, const Buffer& out, const std::string& isa, int threads) {
  const std::string op = "multihead_attention";
  if (!t2t::avx512_bf16_supported()) throw py::value_error(op + ": this CPU has no AVX512-BF16 instructions");
  const t2t::Isa chosen = parse_isa(op, isa);  // attention_forward_cpu takes amx or avx512 of those
  check_fast_dtype(op, "qkv", dtype);
  if (batch <= 0 || tokens <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 16 != 0) {
    throw py::value_error(op + ": batch, tokens and heads must be positive and head_dim a positive multiple of 16");
  }
  if (!(scale > 0.0) || !std::isfinite(scale)) throw py::value_error(op + ": scale must be positive and finite");
  const auto& [address, extent, stride_b, stride_t] = qkv;
  if (stride_b < 0 || stride_t < 0) throw py::value_error(op + ": negative strides");
  if (stride_t > t2t::kAttentionMaxTokenStride) {
    throw py::value_error(op + ": the token stride of qkv exceeds " + std::to_string(t2t::kAttentionMaxTokenStride) +
                          " elements");
  }
  const int64_t width = checked_mul(checked_mul(heads, head_dim), 3);
  const int64_t reach =
      checked_add(checked_add(checked_mul(batch - 1, stride_b), checked_mul(tokens - 1, stride_t)), width);
  const int64_t elem = element_size(dtype);
  check_extent(op, "qkv", address, extent, reach, elem);
  check_extent(op, "out", out.first, out.second, checked_mul(checked_mul(batch, tokens), width / 3), elem);
  t2t::AttentionProblem p{dtype,    batch,    tokens, heads, head_dim, reinterpret_cast<const void*>(address),
                          stride_b, stride_t, static_cast<float>(scale), reinterpret_cast<void*>(out.first)};
  py::gil_scoped_release release;
  t2t::attention_forward_cpu(p, chosen, threads);
}
// One of x, residual: its address, extent and row stride; elements along a row are adjacent.
using Rows = std::tuple<std::uintptr_t, int64_t, int64_t>;

void add_layernorm_forward(const Rows& x, const Rows& residual, int dtype, int64_t rows, int64_t features,
                           const Buffer& weight, const Buffer& bias, double eps, const Buffer& sum,
                           const Buffer& normed, const std::string& isa, int threads) {
  const std::string op = "add_layernorm";
  check_fast_dtype(op, "x, residual", dtype);
  if (rows <= 0 || features <= 0) throw py::value_error(op + ": rows and features must be positive");
  if (!(eps >= 0.0) || !std::isfinite(eps)) throw py::value_error(op + ": eps must be finite and non-negative");
  const int64_t elem = element_size(dtype);
  const char* names[2] = {"x", "residual"};
  const Rows* inputs[2] = {&x, &residual};
  for (int i = 0; i < 2; ++i) {
    const auto& [address, extent, stride] = *inputs[i];
    if (stride < features) throw py::value_error(op + ": the row stride of " + names[i] + " is below its width");
    check_extent(op, names[i], address, extent, checked_add(checked_mul(rows - 1, stride), features), elem);
  }
  check_extent(op, "weight", weight.first, weight.second, features, 4);
  check_extent(op, "bias", bias.first, bias.second, features, 4);
  const int64_t elements = checked_mul(rows, features);
  check_extent(op, "sum", sum.first, sum.second, elements, elem);
  check_extent(op, "normed", normed.first, normed.second, elements, elem);
  const t2t::AddLayerNormProblem p{dtype,
                                   rows,
                                   features,
                                   reinterpret_cast<const void*>(std::get<0>(x)),
                                   std::get<2>(x),
                                   reinterpret_cast<const void*>(std::get<0>(residual)),
                                   std::get<2>(residual),
                                   reinterpret_cast<const float*>(weight.first),
                                   reinterpret_cast<const float*>(bias.first),
                                   static_cast<float>(eps),
                                   reinterpret_cast<void*>(sum.first),
                                   reinterpret_cast<void*>(normed.first)};
  const t2t::Isa chosen = parse_isa(op, isa);
  py::gil_scoped_release release;
  t2t::add_layernorm_forward_cpu(p, chosen, threads);
}
// The linear's sizes: positive; in bfloat16 (AMX tiles) in and out features multiples of 32.
void check_linear_sizes(const std::string& op, int dtype, int64_t out_features, int64_t in_features) {
  check_fast_dtype(op, "the weight", dtype);
  if (out_features <= 0 || in_features <= 0) {
    throw py::value_error(op + ": in_features and out_features must be positive");
  }
  if (dtype == t2t::kBFloat16 &&
      (out_features % t2t::kLinearMultiple != 0 || in_features % t2t::kLinearMultiple != 0)) {
    throw py::value_error(op + ": bfloat16 in_features and out_features must be multiples of " +
                          std::to_string(t2t::kLinearMultiple));
  }
}

// Elements of a packed weight (ValueError where they would not fit int64_t).
int64_t packed_elements(int dtype, int64_t out_features, int64_t in_features) {
  checked_mul(checked_add(out_features, t2t::kLinearPanel), in_features);  // bounds the size rounded up to panels
  return t2t::packed_linear_elements(dtype, out_features, in_features);
}

void linear_pack_weight(const Buffer& weight, int dtype, int64_t out_features, int64_t in_features,
                        const Buffer& packed) {
  const std::string op = "packed_linear";
  check_linear_sizes(op, dtype, out_features, in_features);
  const int64_t elem = element_size(dtype);
  check_extent(op, "weight", weight.first, weight.second, checked_mul(out_features, in_features), elem);
  check_extent(op, "packed", packed.first, packed.second, packed_elements(dtype, out_features, in_features), elem);
  py::gil_scoped_release release;
  t2t::pack_linear_weight(dtype, reinterpret_cast<const void*>(weight.first), out_features, in_features,
                          reinterpret_cast<void*>(packed.first));
}

void linear_forward(const Rows& x, int dtype, int64_t rows, const Buffer& packed, int64_t out_features,
                    int64_t in_features, const Buffer& bias, bool gelu, const Buffer& y, const std::string& isa,
                    int threads) {
  const std::string op = "packed_linear";
  check_linear_sizes(op, dtype, out_features, in_features);
  if (rows <= 0) throw py::value_error(op + ": rows must be positive");
  const int64_t elem = element_size(dtype);
  const auto& [address, extent, stride] = x;
  if (stride < in_features) throw py::value_error(op + ": the row stride of x is below its width");
  check_extent(op, "x", address, extent, checked_add(checked_mul(rows - 1, stride), in_features), elem);
  check_extent(op, "packed", packed.first, packed.second, packed_elements(dtype, out_features, in_features), elem);
  if (bias.first != 0) check_extent(op, "bias", bias.first, bias.second, out_features, elem);
  check_extent(op, "y", y.first, y.second, checked_mul(rows, out_features), elem);
  const t2t::LinearProblem p{dtype,
                             rows,
                             in_features,
                             out_features,
                             reinterpret_cast<const void*>(address),
                             stride,
                             reinterpret_cast<const void*>(packed.first),
                             reinterpret_cast<const void*>(bias.first),
                             gelu,
                             reinterpret_cast<void*>(y.first)};
  const t2t::Isa kernels = parse_isa(op, isa);
  py::gil_scoped_release release;
  t2t::linear_forward_cpu(p, kernels, threads);
}

// A LayerNorm for encoder_forward: weight and bias (float32) as (address, extent), and eps.
using EncoderNormArgs = std::tuple<Buffer, Buffer, double>;
// One block for encoder_forward: norm1; the linears' packed weights and biases as (address, extent), in the order
// qkv, qkv bias, proj, proj bias, fc1, fc1 bias, fc2, fc2 bias (a bias (0, 0) for none); norm2; the attention's
// scale.
using EncoderBlockArgs = std::tuple<EncoderNormArgs, std::array<Buffer, 8>, EncoderNormArgs, double>;

t2t::EncoderNorm encoder_norm(const std::string& op, const char* name, const EncoderNormArgs& args, int64_t dim) {
  const auto& [weight, bias, eps] = args;
  check_extent(op, (std::string(name) + " weight").c_str(), weight.first, weight.second, dim, 4);
  check_extent(op, (std::string(name) + " bias").c_str(), bias.first, bias.second, dim, 4);
  if (!(eps >= 0.0) || !std::isfinite(eps)) throw py::value_error(op + ": eps must be finite and non-negative");
  return {reinterpret_cast<const float*>(weight.first), reinterpret_cast<const float*>(bias.first),
          static_cast<float>(eps)};
}

void encoder_forward(const std::vector<EncoderBlockArgs>& blocks, const EncoderNormArgs& final_norm, int dtype,
                     int64_t batch, int64_t tokens, int64_t dim, int64_t hidden, int64_t heads, const Buffer& x,
                     const Buffer& h, bool cls_only_last, const std::string& isa, int threads) {
  const std::string op = "encoder_blocks";
  check_fast_dtype(op, "x", dtype);
  if (blocks.empty()) throw py::value_error(op + ": no blocks");
  if (batch <= 0 || tokens <= 0 || heads <= 0 || dim % heads != 0 || (dim / heads) % 16 != 0) {
    throw py::value_error(op + ": batch, tokens and heads must be positive and dim / heads a multiple of 16");
  }
  check_linear_sizes(op, dtype, hidden, dim);
  if (checked_mul(3, dim) > t2t::kAttentionMaxTokenStride) throw py::value_error(op + ": dim is too large");
  if (!t2t::avx512_bf16_supported()) throw py::value_error(op + ": this CPU has no AVX512-BF16 instructions");
  const int64_t elements = checked_mul(checked_mul(batch, tokens), dim), elem = element_size(dtype);
  check_extent(op, "x", x.first, x.second, elements, elem);
  check_extent(op, "h", h.first, h.second, elements, elem);
  if (x.first < h.first + elem * elements && h.first < x.first + elem * elements) {
    throw py::value_error(op + ": x and h overlap");
  }
  const char* linear_names[4] = {"qkv", "proj", "fc1", "fc2"};
  const int64_t linear_sizes[4][2] = {{3 * dim, dim}, {dim, dim}, {hidden, dim}, {dim, hidden}};
  std::vector<t2t::EncoderBlock> table(blocks.size());
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    const auto& [norm1, linears, norm2, scale] = blocks[i];
    const void* pointers[8];
    for (int l = 0; l < 4; ++l) {
      const auto [out_features, in_features] = linear_sizes[l];
      const Buffer &weight = linears[2 * l], &bias = linears[2 * l + 1];
      check_extent(op, linear_names[l], weight.first, weight.second,
                   packed_elements(dtype, out_features, in_features), elem);
      if (bias.first != 0) check_extent(op, linear_names[l], bias.first, bias.second, out_features, elem);
      pointers[2 * l] = reinterpret_cast<const void*>(weight.first);
      pointers[2 * l + 1] = reinterpret_cast<const void*>(bias.first);
    }
    if (!(scale > 0.0) || !std::isfinite(scale)) throw py::value_error(op + ": scale must be positive and finite");
    table[i] = {encoder_norm(op, "norm1", norm1, dim), pointers[0], pointers[1], static_cast<float>(scale),
                pointers[2], pointers[3], encoder_norm(op, "norm2", norm2, dim), pointers[4], pointers[5],
                pointers[6], pointers[7]};
  }
  const t2t::EncoderProblem p{dtype,
                              parse_isa(op, isa),
                              batch,
                              tokens,
                              dim,
                              hidden,
                              heads,
                              table.data(),
                              static_cast<int64_t>(table.size()),
                              encoder_norm(op, "final norm", final_norm, dim),
                              reinterpret_cast<void*>(x.first),
                              reinterpret_cast<void*>(h.first),
                              cls_only_last};
  py::gil_scoped_release release;
  t2t::encoder_forward_cpu(p, threads);
}

// A hash of 8 8-byte words spread evenly over each buffer (address, bytes), plus its trailing bytes: what the
// caches of packed weights compare to see a write that leaves a weight's version counter alone (through
// ``weight.data``), at the cost of a few cache lines a buffer.
std::uint64_t sample_fingerprint(const std::vector<std::pair<std::uintptr_t, std::int64_t>>& buffers) {
  constexpr std::int64_t kWords = 8;
  constexpr std::uint64_t kPrime = 1099511628211ull;  // FNV-1a
  std::uint64_t hash = 1469598103934665603ull;
  for (const auto& [address, bytes] : buffers) {
    const auto* base = reinterpret_cast<const unsigned char*>(address);
    const std::int64_t words = bytes / 8;
    for (std::int64_t i = 0; i < std::min(words, kWords); ++i) {
      const std::int64_t at = words <= kWords ? i : i * (words - 1) / (kWords - 1);
      std::uint64_t word;
      std::memcpy(&word, base + at * 8, sizeof(word));
      hash = (hash ^ word) * kPrime;
    }
    for (std::int64_t b = words * 8; b < bytes; ++b) {
      hash = (hash ^ base[b]) * kPrime;
    }
  }
  return hash;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "t2t_fast native kernels (CPU always; CUDA when built with nvcc)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("compiled_kernels", &compiled_kernels, "Names of the kernels compiled into this build");

  m.def("sample_fingerprint", &sample_fingerprint, py::arg("buffers"),
        "Hash of 8 words spread over each (address, bytes) buffer (the packed-weight caches' check for writes "
        "through .data)");
  m.def("cpu_isas", &cpu_isas, "ISAs of the vectorised CPU kernels this CPU runs, best first");
  m.def("soft_split_layernorm_forward_cpu", &soft_split_layernorm_forward, py::arg("x"), py::arg("x_extent"),
        py::arg("sizes"), py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("strides"),
        py::arg("x_dtype"), py::arg("weight"), py::arg("bias"), py::arg("params_extent"), py::arg("eps"),
        py::arg("y"), py::arg("y_extent"), py::arg("y_dtype"), py::arg("mean"), py::arg("rstd"),
        py::arg("stats_extent"), py::arg("isa"), py::arg("threads"),
        "Fused soft split + LayerNorm: y (B, L, F) contiguous, mean and rstd (B*L) float32, from x viewed as "
        "(B, C, H, W) through `strides`; float32 weight and bias of F");
  m.def("favor_attention_forward_cpu", &favor_attention_forward, py::arg("k"), py::arg("q"), py::arg("v"),
        py::arg("dtype"), py::arg("batch"), py::arg("tokens"), py::arg("width"), py::arg("features"),
        py::arg("w_t"), py::arg("log_eps_m"), py::arg("y"), py::arg("s"), py::arg("z"), py::arg("c_k"),
        py::arg("isa"), py::arg("threads"),
        "Fused FAVOR+ forward: y (B, T, e) contiguous and the float32 state s (B, m, e), z (B, m), c_k (B, m); "
        "k, q, v as (address, extent, batch stride, token stride) with adjacent elements along e; w_t (e, m "
        "rounded up to 16) float32; the outputs and w_t as (address, extent)");

  m.def("add_layernorm_forward_cpu", &add_layernorm_forward, py::arg("x"), py::arg("residual"), py::arg("dtype"),
        py::arg("rows"), py::arg("features"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("sum"),
        py::arg("normed"), py::arg("isa"), py::arg("threads"),
        "Residual add + LayerNorm forward in float32 or bfloat16: sum = x + residual and normed = its LayerNorm "
        "(float32 statistics, float32 weight and bias of `features`), both (rows, features) contiguous; x and "
        "residual as (address, extent, row stride) with adjacent elements along a row; the rest as (address, "
        "extent)");

  m.def("linear_pack_weight_cpu", &linear_pack_weight, py::arg("weight"), py::arg("dtype"), py::arg("out_features"),
        py::arg("in_features"), py::arg("packed"),
        "A (out_features, in_features) weight, contiguous, into the layout of linear_forward_cpu "
        "(linear_packed_elements elements); both as (address, extent)");
  m.def("linear_packed_elements", &packed_elements, py::arg("dtype"), py::arg("out_features"),
        py::arg("in_features"), "Elements of a weight packed by linear_pack_weight_cpu");
  m.def("linear_forward_cpu", &linear_forward, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("packed"),
        py::arg("out_features"), py::arg("in_features"), py::arg("bias"), py::arg("gelu"), py::arg("y"),
        py::arg("isa"), py::arg("threads"),
        "Linear on a packed weight, bfloat16 (in and out features multiples of 32) on AMX tiles (isa 'amx') or "
        "AVX512-BF16 (isa 'avx512'), float32 on AVX-512 (isa 'avx512' or 'amx'): y (rows, out_features) "
        "contiguous = x packed^T + bias, then the exact GELU if gelu; x as "
        "(address, extent, row stride) with adjacent elements along a row, bias (address, extent) or address 0 "
        "for none");
  m.def("encoder_forward_cpu", &encoder_forward, py::arg("blocks"), py::arg("final_norm"), py::arg("dtype"),
        py::arg("batch"), py::arg("tokens"), py::arg("dim"), py::arg("hidden"), py::arg("heads"), py::arg("x"),
        py::arg("h"), py::arg("cls_only_last"), py::arg("isa"), py::arg("threads"),
        "Pre-norm blocks in order, bfloat16 or float32 (isa 'amx' or 'avx512'): x (batch * tokens, "
        "dim) the residual stream, overwritten with the last block's output, and h written with final_norm of it, "
        "both contiguous (address, extent); with cls_only_last the last block past its qkv for token 0 of each "
        "image alone, x's and h's first batch rows then holding those rows; blocks: per block (norm1, (qkv, qkv "
        "bias, proj, proj bias, fc1, fc1 bias, fc2, fc2 bias), norm2, scale), a norm as (weight, bias, eps) with "
        "float32 parameters, weights packed as linear_pack_weight_cpu packs them, biases in dtype or (0, 0); fc1 is "
        "followed by the exact GELU");
  m.attr("attention_max_token_stride") = t2t::kAttentionMaxTokenStride;
  m.def("avx512_bf16_supported", &t2t::avx512_bf16_supported,
        "Whether this CPU has AVX-512 with BF16 dot products (attention_forward_cpu needs them, and "
        "linear_forward_cpu's bfloat16 without AMX tiles)");
  m.def("attention_forward_cpu", &attention_forward, py::arg("qkv"), py::arg("dtype"), py::arg("batch"),
        py::arg("tokens"), py::arg("heads"), py::arg("head_dim"), py::arg("scale"), py::arg("out"), py::arg("isa"),
        py::arg("threads"),
        "Softmax attention forward in float32 or bfloat16: out (B, T, heads*head_dim) contiguous from qkv viewed as "
        "(B, T, 3, heads, head_dim), given as (address, extent, batch stride, token stride) with adjacent "
        "elements along the last dimension; out as (address, extent); isa 'amx' (bfloat16 products on AMX tiles "
        "where the head size is a multiple of 32) or 'avx512'");

  constexpr auto kForward = Direction::kForward;
  constexpr auto kBackward = Direction::kBackward;
  const std::array<const char*, 4> kForwardBuffers = {"x", "x_extent", "y", "y_extent"};
  const std::array<const char*, 4> kBackwardBuffers = {"dy", "dy_extent", "dx", "dx_extent"};
  def_checked<kForward, true>(
      m, "restructurize_unfold_forward_cpu", &restructurize_unfold_forward, kForwardBuffers,
      "y (B, L, C*kh*kw) contiguous <- x viewed as (B, C, H, W) through `strides`; addresses as integers, each "
      "with the elements its buffer holds from there; isa: of the vectorised kernels (the 3x3 windows of "
      "channels-last tokens)",
      py::arg("threads"), py::arg("isa"));
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
