// Threads over (image, head, block of query rows) for the attention kernel of attention_cpu_avx512_bf16.cpp.
#include "attention_cpu.h"

#include "restructurize_unfold.h"

#include <omp.h>

#include <stdexcept>
#include <vector>

namespace t2t {

bool attention_bf16_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void attention_forward_cpu(const AttentionProblem& p, int threads) {
  if (!attention_bf16_supported()) {
    throw std::invalid_argument("this CPU has no AVX512-BF16 instructions for the attention kernel");
  }
  threads = threads < 1 ? 1 : threads;
  const int64_t heads = p.batch * p.heads;
  const int64_t tiles = (p.tokens + kAttentionRows - 1) / kAttentionRows;
  // One task per head when there are enough of them (k and v are packed once per task); otherwise the query
  // rows of a head are split so that every thread has work.
  int64_t splits = heads >= threads ? 1 : (threads + heads - 1) / heads;
  splits = splits < tiles ? splits : tiles;
  const int64_t rows_per_split = (tiles + splits - 1) / splits * kAttentionRows;
  const int64_t keys_pad = (p.tokens + 15) / 16 * 16;
  // 64-byte aligned pieces, in 4-byte words: keys, v pairs (bfloat16 only), scores, probabilities
  const int64_t half = p.dtype == kFloat32 ? 1 : 2;  // elements per word
  const int64_t key_words = p.head_dim * keys_pad / half;
  const int64_t value_words = p.dtype == kFloat32 ? 0 : key_words;
  const int64_t score_words = kAttentionRows * keys_pad;
  const int64_t prob_words = kAttentionRows * keys_pad / half;
  const int64_t words = key_words + value_words + score_words + prob_words + 16;
  std::vector<uint32_t> scratch(static_cast<std::size_t>(threads) * words);

#pragma omp parallel num_threads(threads)
  {
    uint32_t* base = scratch.data() + static_cast<int64_t>(omp_get_thread_num()) * words;
    while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
    AttentionWork work{keys_pad, base, base + key_words, reinterpret_cast<float*>(base + key_words + value_words),
                       base + key_words + value_words + score_words};
#pragma omp for schedule(static)
    for (int64_t task = 0; task < heads * splits; ++task) {
      const int64_t head = task / splits, first = (task % splits) * rows_per_split;
      if (first >= p.tokens) continue;
      const int64_t count = p.tokens - first < rows_per_split ? p.tokens - first : rows_per_split;
      avx512_bf16::attention_head(p, head / p.heads, head % p.heads, first, count, work);
    }
  }
}

}  // namespace t2t
