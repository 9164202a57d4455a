// FAVOR+ forward on the CPU: threads over (image, chunk of tokens), the vectorised chunk kernels of
// cpu_kernels.inc, and the per-image combination of the chunks' key-side sums in between.
//
// Key side, per chunk: a_t = k_t w^T - |k_t|^2/2, the chunk's own shift c = max_t a_t per feature, K = exp(a - c),
// partial S = K^T v and z = sum_t K. Per image the chunks combine under the image's shift c_k = max over chunks:
// S' = sum_chunks exp(c - c_k) S, likewise z', which equals the single-shift sums of the torch path (each K
// term rescaled by exp(c - c_k) is exp(a - c_k)). Query side, per chunk: y from c_k, S', z'.
#include "favor_attention_cpu.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "restructurize_unfold.h"

namespace t2t {

namespace {
int64_t chunks_of(int64_t tokens) { return (tokens + kFavorChunk - 1) / kFavorChunk; }

// w_t (e x features_pad floats) in the pairs of FavorProblem::w_pairs, or an empty vector when an element is not a
// bfloat16 number (its low 16 bits set) or e is odd: then the projections keep to float32 products.
std::vector<uint16_t> w_in_pairs(const FavorProblem& p) {
  const int64_t e = p.width, mp = p.features_pad;
  if (e % 2 != 0) return {};
  std::vector<uint16_t> pairs(static_cast<std::size_t>(e * mp));
  for (int64_t i = 0; i < e; ++i) {
    for (int64_t j = 0; j < mp; ++j) {
      uint32_t bits;
      std::memcpy(&bits, &p.w_t[i * mp + j], sizeof(bits));
      if (bits & 0xffffu) return {};
      pairs[(i / 2 * mp + j) * 2 + i % 2] = static_cast<uint16_t>(bits >> 16);
    }
  }
  return pairs;
}
}  // namespace

int64_t favor_work_floats(const FavorProblem& p) {
  // key side: k and v rows (chunk x width_pad each) and features (chunk x features_pad); query side: q and y rows,
  // features and two floats per token
  return kFavorChunk * (2 * p.width_pad + p.features_pad + 2);
}

void favor_attention_forward_cpu(FavorProblem p, float* s, float* z, float* c_k, Isa isa, int threads) {
  const CpuKernels& kernels = cpu_kernels(isa);
  threads = threads < 1 ? 1 : threads;
  const int64_t chunks = chunks_of(p.tokens);
  const int64_t m = p.features, e = p.width, mp = p.features_pad, ep = p.width_pad;
  const int64_t tasks = p.batch * chunks;
  // the key side writes every element of the chunks' partial results that the reduction reads: no zero fill
  std::unique_ptr<float[]> chunk_max(new float[tasks * mp]), chunk_s(new float[tasks * mp * ep]),
      chunk_z(new float[tasks * mp]);
  std::vector<float> c_k_pad(p.batch * mp), s_pad(p.batch * mp * ep, 0.0f), z_pad(p.batch * mp, 0.0f);
  const int64_t work_floats = favor_work_floats(p);
  std::vector<float> work(static_cast<std::size_t>(threads) * work_floats);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<uint16_t> w_pairs =
      kernels.favor_pairs && p.dtype == kBFloat16 ? w_in_pairs(p) : std::vector<uint16_t>();
  p.w_pairs = w_pairs.empty() ? nullptr : w_pairs.data();
  p.c_k_pad = c_k_pad.data();
  p.s_pad = s_pad.data();
  p.z_pad = z_pad.data();

#pragma omp parallel num_threads(threads)
  {
    float* mine = work.data() + static_cast<int64_t>(omp_get_thread_num()) * work_floats;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t image = task / chunks, first = (task % chunks) * kFavorChunk;
      const int64_t count = p.tokens - first < kFavorChunk ? p.tokens - first : kFavorChunk;
      kernels.favor_key_chunk(p, image, first, count, mine, &chunk_max[task * mp], &chunk_s[task * mp * ep],
                              &chunk_z[task * mp]);
    }
    // Per image: c_k, then the chunks' sums rescaled to it, in chunk order (deterministic).
#pragma omp for schedule(static)
    for (int64_t image = 0; image < p.batch; ++image) {
      const int64_t first_task = image * chunks;
      for (int64_t j = 0; j < mp; ++j) {
        float shift = -inf;
        for (int64_t c = 0; c < chunks; ++c) shift = std::fmax(shift, chunk_max[(first_task + c) * mp + j]);
        if (j >= m) {
          c_k_pad[image * mp + j] = -inf;  // padding features: P = 0 on the query side
          continue;
        }
        shift = shift > -inf ? shift : 0.0f;  // no finite key: K = 0 everywhere, S' = z' = 0
        c_k_pad[image * mp + j] = shift;
        c_k[image * m + j] = shift;
        float* s_row = &s_pad[(image * mp + j) * ep];
        float z_sum = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t task = first_task + c;
          const float chunk_shift = chunk_max[task * mp + j];
          if (!(chunk_shift > -inf)) continue;  // the chunk's K column is 0
          const float scale = std::exp(chunk_shift - shift);
          const float* part = &chunk_s[(task * mp + j) * ep];
          for (int64_t i = 0; i < e; ++i) s_row[i] += scale * part[i];
          z_sum += scale * chunk_z[task * mp + j];
        }
        z_pad[image * mp + j] = z_sum;
        z[image * m + j] = z_sum;
        for (int64_t i = 0; i < e; ++i) s[(image * m + j) * e + i] = s_row[i];
      }
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t image = task / chunks, first = (task % chunks) * kFavorChunk;
      const int64_t count = p.tokens - first < kFavorChunk ? p.tokens - first : kFavorChunk;
      kernels.favor_query_chunk(p, image, first, count, mine);
    }
  }
}

}  // namespace t2t
