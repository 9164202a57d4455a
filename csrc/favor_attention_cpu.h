// FAVOR+ linear attention forward on the CPU: the stabilised computation of t2t_fast/ops/favor_attention.py
// (per-image key shifts c_k, per-token query shifts c_q, the eps term in log space, the 2^-64 query scale),
// fused: k, q, v are read once, the features never reach memory. float32 maths; k, q, v, y in float32 or
// bfloat16.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace t2t {

// Tokens per chunk: the unit of work of a thread (its key-side partial sums are combined in chunk order, so
// the result does not depend on the number of threads).
constexpr int64_t kFavorChunk = 128;

struct FavorProblem {
  int dtype;                               // of k, q, v and y: kFloat32 or kBFloat16
  int64_t batch, tokens, width, features;  // B, T, e, m
  int64_t width_pad, features_pad;         // e and m rounded up to 16 (the lanes of the widest ISA)
  // k, q, v: element (b, t, i) at [b * stride_b + t * stride_t + i]
  const void *k, *q, *v;
  int64_t k_stride_b, k_stride_t, q_stride_b, q_stride_t, v_stride_b, v_stride_t;
  const float* w_t;  // (e, features_pad): w transposed, zero past m
  // w in bfloat16 pairs, for kernels that take them (CpuKernels::favor_pairs) when every element of w is a
  // bfloat16 number and e is even; else nullptr. Per input pair i (e / 2 of them), per feature j < features_pad:
  // w[j][2i], w[j][2i + 1] (zero past m).
  const uint16_t* w_pairs;
  float log_eps_m;   // log(eps * m), -inf for eps = 0
  // Per image, from the key side: c_k (features_pad, -inf past m), S' (features_pad, width_pad) and z'
  // (features_pad), zero past m and e.
  const float *c_k_pad, *s_pad, *z_pad;
  void* y;  // (B, T, e) contiguous
};

// Floats of per-thread scratch the chunk kernels need.
int64_t favor_work_floats(const FavorProblem& p);

// The forward: y (B, T, e) and the saved state s (B, m, e), z (B, m), c_k (B, m), all contiguous float32
// but y (p.dtype). Fills p's per-image pointers itself (p.c_k_pad, p.s_pad, p.z_pad are ignored on input).
void favor_attention_forward_cpu(FavorProblem p, float* s, float* z, float* c_k, Isa isa, int threads);

}  // namespace t2t
