// The blocks of encoder_cpu.h: each kernel threads itself; the activations between them live in one scratch
// buffer, allocated once per call.
#include "encoder_cpu.h"

#include <stdexcept>
#include <vector>

#include "add_layernorm_cpu.h"
#include "attention_cpu.h"
#include "linear_cpu.h"

namespace t2t {

namespace {

// h = the LayerNorm of x's rows (the first block's norm1; every later one is fused with a residual add).
void layernorm(const EncoderProblem& p, const EncoderNorm& norm, int threads) {
  const CpuKernels& kernels = cpu_kernels(Isa::kAmx);
  const int64_t rows = p.batch * p.tokens, per_thread = (rows + threads - 1) / threads;
  std::vector<float> statistics(2 * rows);  // mean and rstd, which inference does not keep
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int thread = 0; thread < threads; ++thread) {
    const int64_t first = thread * per_thread, count = rows - first < per_thread ? rows - first : per_thread;
    if (count > 0) {
      kernels.layernorm_rows(p.x + first * p.dim, kBFloat16, p.dim, count, p.dim, norm.weight, norm.bias, norm.eps,
                             p.h + first * p.dim, kBFloat16, statistics.data() + first,
                             statistics.data() + rows + first);
    }
  }
}

// x + branch into x, in place (each row is read before its sum is written), and its LayerNorm into h.
void add_layernorm(const EncoderProblem& p, const uint16_t* branch, const EncoderNorm& norm, int threads) {
  add_layernorm_forward_cpu({kBFloat16, p.batch * p.tokens, p.dim, p.x, p.dim, branch, p.dim, norm.weight,
                             norm.bias, norm.eps, p.x, p.h},
                            Isa::kAmx, threads);
}

}  // namespace

void encoder_forward_amx(const EncoderProblem& p, int threads) {
  if (best_cpu_isa() != Isa::kAmx) throw std::invalid_argument("this CPU (or the OS) gives no AMX tiles");
  threads = threads < 1 ? 1 : threads;
  const int64_t rows = p.batch * p.tokens, dim = p.dim;
  std::vector<uint16_t> scratch(rows * (5 * dim + p.hidden));
  uint16_t* qkv = scratch.data();
  uint16_t* mixed = qkv + rows * 3 * dim;  // the attention's output
  uint16_t* branch = mixed + rows * dim;   // proj's and fc2's outputs, before the residual add
  uint16_t* hidden = branch + rows * dim;  // fc1's, after the GELU
  layernorm(p, p.blocks[0].norm1, threads);
  for (int64_t i = 0; i < p.count; ++i) {
    const EncoderBlock& b = p.blocks[i];
    linear_forward_amx({rows, dim, 3 * dim, p.h, dim, b.qkv, b.qkv_bias, false, qkv}, threads);
    attention_forward_cpu({kBFloat16, p.batch, p.tokens, p.heads, dim / p.heads, qkv, p.tokens * 3 * dim, 3 * dim,
                           b.scale, mixed},
                          Isa::kAmx, threads);
    linear_forward_amx({rows, dim, dim, mixed, dim, b.proj, b.proj_bias, false, branch}, threads);
    add_layernorm(p, branch, b.norm2, threads);
    linear_forward_amx({rows, dim, p.hidden, p.h, dim, b.fc1, b.fc1_bias, true, hidden}, threads);
    linear_forward_amx({rows, p.hidden, dim, hidden, p.hidden, b.fc2, b.fc2_bias, false, branch}, threads);
    add_layernorm(p, branch, i + 1 < p.count ? p.blocks[i + 1].norm1 : p.final_norm, threads);
  }
}

}  // namespace t2t
