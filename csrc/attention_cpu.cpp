// Threads over (image, head, block of query rows) for the attention kernel of attention_cpu_avx512_bf16.cpp.
#include "attention_cpu.h"

#include "restructurize_unfold.h"

#include <omp.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace t2t {

bool attention_uses_tiles(const AttentionProblem& p, Isa isa) {
  return isa == Isa::kAmx && p.dtype == kBFloat16 && p.head_dim % 32 == 0;
}

void attention_forward_cpu(const AttentionProblem& p, Isa isa, int threads) {
  if (!avx512_bf16_supported()) {
    throw std::invalid_argument("this CPU has no AVX512-BF16 instructions for the attention kernel");
  }
  if (isa != Isa::kAmx && isa != Isa::kAvx512) {
    throw std::invalid_argument(std::string("the attention kernel runs with amx or avx512, not ") + isa_name(isa));
  }
  if (static_cast<int>(isa) > static_cast<int>(best_cpu_isa())) {
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels");
  }
  const bool tiles = attention_uses_tiles(p, isa);
  const int64_t tile_rows = tiles ? kAttentionTileRows : kAttentionRows;
  threads = threads < 1 ? 1 : threads;
  const int64_t heads = p.batch * p.heads;
  const int64_t tiles_per_head = (p.tokens + tile_rows - 1) / tile_rows;
  // One task per head when there are enough of them (k and v are packed once per task); otherwise the query
  // rows of a head are split so that every thread has work.
  int64_t splits = heads >= threads ? 1 : (threads + heads - 1) / heads;
  splits = splits < tiles_per_head ? splits : tiles_per_head;
  const int64_t rows_per_split = (tiles_per_head + splits - 1) / splits * tile_rows;
  const int64_t key_multiple = tiles ? kAttentionTileKeys : 16;
  const int64_t keys_pad = (p.tokens + key_multiple - 1) / key_multiple * key_multiple;
  // 64-byte aligned pieces, in 4-byte words: keys, v pairs (bfloat16 only), scores, probabilities, and with tiles
  // the query rows and P v rows
  const int64_t half = p.dtype == kFloat32 ? 1 : 2;  // elements per word
  const auto aligned = [](int64_t words) { return (words + 15) / 16 * 16; };
  const int64_t key_words = aligned(p.head_dim * keys_pad / half);
  const int64_t value_words = p.dtype == kFloat32 ? 0 : key_words;
  const int64_t score_words = aligned(tile_rows * keys_pad);
  const int64_t prob_words = aligned(tile_rows * keys_pad / half);
  const int64_t q_words = tiles ? aligned(tile_rows * p.head_dim / 2) : 0;
  const int64_t out_words = tiles ? aligned(tile_rows * p.head_dim) : 0;
  const int64_t words = key_words + value_words + score_words + prob_words + q_words + out_words + 16;
  std::vector<uint32_t> scratch(static_cast<std::size_t>(threads) * words);

#pragma omp parallel num_threads(threads)
  {
    uint32_t* base = scratch.data() + static_cast<int64_t>(omp_get_thread_num()) * words;
    while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
    uint32_t* scores = base + key_words + value_words;
    uint32_t* q_rows = scores + score_words + prob_words;
    AttentionWork work{keys_pad, base, base + key_words, reinterpret_cast<float*>(scores), scores + score_words,
                       reinterpret_cast<uint16_t*>(q_rows), reinterpret_cast<float*>(q_rows + q_words)};
#pragma omp for schedule(static)
    for (int64_t task = 0; task < heads * splits; ++task) {
      const int64_t head = task / splits, first = (task % splits) * rows_per_split;
      if (first >= p.tokens) continue;
      const int64_t count = p.tokens - first < rows_per_split ? p.tokens - first : rows_per_split;
      if (tiles) {
        avx512_bf16::attention_head_tiles(p, head / p.heads, head % p.heads, first, count, work);
      } else {
        avx512_bf16::attention_head(p, head / p.heads, head % p.heads, first, count, work);
      }
    }
  }
}

}  // namespace t2t
