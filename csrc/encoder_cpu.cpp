// The blocks of encoder_cpu.h: each kernel threads itself; the activations between them live in one scratch
// buffer, allocated once per call.
#include "encoder_cpu.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "add_layernorm_cpu.h"
#include "attention_cpu.h"
#include "linear_cpu.h"
#include "restructurize_unfold.h"

namespace t2t {

namespace {

char* rows_at(void* base, const EncoderProblem& p, int64_t row) {
  return static_cast<char*>(base) + row * p.dim * element_size(p.dtype);
}

// h = the LayerNorm of x's rows (the first block's norm1; every later one is fused with a residual add).
void layernorm(const EncoderProblem& p, const EncoderNorm& norm, int threads) {
  const CpuKernels& kernels = cpu_kernels(p.isa);
  const int64_t rows = p.batch * p.tokens, per_thread = (rows + threads - 1) / threads;
  std::vector<float> statistics(2 * rows);  // mean and rstd, which inference does not keep
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int thread = 0; thread < threads; ++thread) {
    const int64_t first = thread * per_thread, count = rows - first < per_thread ? rows - first : per_thread;
    if (count > 0) {
      kernels.layernorm_rows(rows_at(p.x, p, first), p.dtype, p.dim, count, p.dim, norm.weight, norm.bias, norm.eps,
                             rows_at(p.h, p, first), p.dtype, statistics.data() + first,
                             statistics.data() + rows + first);
    }
  }
}

// x + branch into x, in place (each row is read before its sum is written), and its LayerNorm into h.
void add_layernorm(const EncoderProblem& p, const void* branch, const EncoderNorm& norm, int threads) {
  add_layernorm_forward_cpu({p.dtype, p.batch * p.tokens, p.dim, p.x, p.dim, branch, p.dim, norm.weight, norm.bias,
                             norm.eps, p.x, p.h},
                            p.isa, threads);
}

// The cls token's attention output alone, (batch, dim) into out, from qkv: per image and head the scores of query
// row 0 against every key, their softmax and the probabilities' sum of v, in float32, rounded to the dtype once.
template <int D>
void cls_attention(const EncoderProblem& p, const void* qkv, float scale, void* out, int threads) {
  using Element = Scalar<D>;
  using Storage = typename Element::storage;
  const Storage* in = static_cast<const Storage*>(qkv);
  const int64_t head_dim = p.dim / p.heads, width = 3 * p.dim;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < p.batch * p.heads; ++task) {
    const int64_t image = task / p.heads, head = task % p.heads;
    const Storage* rows = in + image * p.tokens * width + head * head_dim;  // q of token t at rows + t * width
    std::vector<float> query(head_dim), probabilities(p.tokens), sums(head_dim, 0.0f);
    for (int64_t i = 0; i < head_dim; ++i) query[i] = Element::load(rows[i]);
    float top = -INFINITY;
    for (int64_t t = 0; t < p.tokens; ++t) {
      const Storage* key = rows + t * width + p.dim;
      float score = 0.0f;
      for (int64_t i = 0; i < head_dim; ++i) score += query[i] * Element::load(key[i]);
      probabilities[t] = score * scale;
      top = probabilities[t] > top ? probabilities[t] : top;
    }
    float total = 0.0f;
    for (int64_t t = 0; t < p.tokens; ++t) total += probabilities[t] = std::exp(probabilities[t] - top);
    for (int64_t t = 0; t < p.tokens; ++t) {
      const Storage* value = rows + t * width + 2 * p.dim;
      const float weight = probabilities[t] / total;
      for (int64_t i = 0; i < head_dim; ++i) sums[i] += weight * Element::load(value[i]);
    }
    Storage* o = static_cast<Storage*>(out) + image * p.dim + head * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) o[i] = Element::store(sums[i]);
  }
}

// The last block for the cls rows alone (EncoderProblem::cls_only_last), from h = its norm1 of every row.
void cls_block(const EncoderProblem& p, const EncoderBlock& b, char* qkv, char* mixed, char* branch, char* hidden,
               int threads) {
  const int64_t rows = p.batch * p.tokens, dim = p.dim, elem = element_size(p.dtype);
  linear_forward_cpu({p.dtype, rows, dim, 3 * dim, p.h, dim, b.qkv, b.qkv_bias, false, qkv}, p.isa, threads);
  if (p.dtype == kFloat32) {
    cls_attention<kFloat32>(p, qkv, b.scale, mixed, threads);
  } else {
    cls_attention<kBFloat16>(p, qkv, b.scale, mixed, threads);
  }
  // the cls rows of the stream to its first rows (row image * tokens -> row image: never one still to be read)
  for (int64_t image = 1; image < p.batch; ++image) {
    std::memmove(rows_at(p.x, p, image), rows_at(p.x, p, image * p.tokens), dim * elem);
  }
  const EncoderProblem cls{p.dtype, p.isa, p.batch, 1, dim, p.hidden, p.heads, p.blocks, p.count, p.final_norm,
                           p.x, p.h, false};
  linear_forward_cpu({p.dtype, p.batch, dim, dim, mixed, dim, b.proj, b.proj_bias, false, branch}, p.isa, threads);
  add_layernorm(cls, branch, b.norm2, threads);
  linear_forward_cpu({p.dtype, p.batch, dim, p.hidden, p.h, dim, b.fc1, b.fc1_bias, true, hidden}, p.isa, threads);
  linear_forward_cpu({p.dtype, p.batch, p.hidden, dim, hidden, p.hidden, b.fc2, b.fc2_bias, false, branch}, p.isa,
                    threads);
  add_layernorm(cls, branch, p.final_norm, threads);
}

}  // namespace

void encoder_forward_cpu(const EncoderProblem& p, int threads) {
  if (p.isa != Isa::kAmx && p.isa != Isa::kAvx512) {
    throw std::invalid_argument(std::string("the encoder's kernels do not run with ") + isa_name(p.isa));
  }
  cpu_kernels(p.isa);  // std::invalid_argument where this CPU cannot run isa
  threads = threads < 1 ? 1 : threads;
  const int64_t rows = p.batch * p.tokens, dim = p.dim, elem = element_size(p.dtype);
  std::vector<char> scratch(rows * (5 * dim + p.hidden) * elem);
  char* qkv = scratch.data();
  char* mixed = qkv + rows * 3 * dim * elem;  // the attention's output
  char* branch = mixed + rows * dim * elem;   // proj's and fc2's outputs, before the residual add
  char* hidden = branch + rows * dim * elem;  // fc1's, after the GELU
  layernorm(p, p.blocks[0].norm1, threads);
  const int64_t full_blocks = p.cls_only_last ? p.count - 1 : p.count;
  for (int64_t i = 0; i < full_blocks; ++i) {
    const EncoderBlock& b = p.blocks[i];
    linear_forward_cpu({p.dtype, rows, dim, 3 * dim, p.h, dim, b.qkv, b.qkv_bias, false, qkv}, p.isa, threads);
    attention_forward_cpu({p.dtype, p.batch, p.tokens, p.heads, dim / p.heads, qkv, p.tokens * 3 * dim, 3 * dim,
                           b.scale, mixed},
                          p.isa, threads);
    linear_forward_cpu({p.dtype, rows, dim, dim, mixed, dim, b.proj, b.proj_bias, false, branch}, p.isa, threads);
    add_layernorm(p, branch, b.norm2, threads);
    linear_forward_cpu({p.dtype, rows, dim, p.hidden, p.h, dim, b.fc1, b.fc1_bias, true, hidden}, p.isa, threads);
    linear_forward_cpu({p.dtype, rows, p.hidden, dim, hidden, p.hidden, b.fc2, b.fc2_bias, false, branch}, p.isa,
                      threads);
    add_layernorm(p, branch, i + 1 < p.count ? p.blocks[i + 1].norm1 : p.final_norm, threads);
  }
  if (p.cls_only_last) cls_block(p, p.blocks[p.count - 1], qkv, mixed, branch, hidden, threads);
}

}  // namespace t2t
