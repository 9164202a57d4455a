// The backbone's pre-norm blocks for bfloat16 inference on AMX CPUs, a run of them in one call: per block the
// kernels CPU inference otherwise calls one at a time from Python (the AMX linear, the attention kernel, the
// residual add + LayerNorm), with nothing between them.
#pragma once

#include <cstdint>

namespace t2t {

// A LayerNorm's float32 parameters.
struct EncoderNorm {
  const float *weight, *bias;
  float eps;
};

// One block: linear weights packed by pack_linear_weight, bf16 biases (nullptr for none).
struct EncoderBlock {
  EncoderNorm norm1;
  const uint16_t *qkv, *qkv_bias;    // (3 dim, dim)
  float scale;                       // of the attention's scores
  const uint16_t *proj, *proj_bias;  // (dim, dim)
  EncoderNorm norm2;
  const uint16_t *fc1, *fc1_bias;    // (hidden, dim), followed by the exact GELU
  const uint16_t *fc2, *fc2_bias;    // (dim, hidden)
};

struct EncoderProblem {
  int64_t batch, tokens, dim, hidden, heads;  // dim and hidden multiples of 32, dim / heads a multiple of 16
  const EncoderBlock* blocks;
  int64_t count;  // >= 1
  EncoderNorm final_norm;  // the LayerNorm of the last block's output
  // (batch * tokens, dim) bf16, contiguous. x: the residual stream into the first block, overwritten by the one
  // out of the last; h (written): final_norm of that.
  uint16_t* x;
  uint16_t* h;
};

// The blocks in order; std::invalid_argument when this CPU (or the OS) gives no AMX tiles.
void encoder_forward_amx(const EncoderProblem& p, int threads);

}  // namespace t2t
