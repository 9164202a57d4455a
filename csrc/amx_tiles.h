// AMX tile helpers of the translation units that use the tiles (attention_cpu_avx512_bf16.cpp,
// linear_cpu_amx.cpp): the one tile configuration they share and its 2 x 2 blocked product step.
//
// No include guard and internal linkage only, as cpu_vector.h: included once per unit, inside its namespace, after
// its `#pragma GCC target` (with amx-tile and amx-bf16).

// Every tile 16 rows of 64 bytes: 16 x 32 bf16 of an A operand (tmm0: rows 0-15, tmm1: rows 16-31), 16 pairs x 16
// columns of a B operand packed in pairs (tmm2, tmm3), 16 x 16 float32 products: tmm4 = tmm0 x tmm2,
// tmm5 = tmm0 x tmm3, tmm6 = tmm1 x tmm2, tmm7 = tmm1 x tmm3. Each A and B tile loaded serves two products.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Per thread, before its first tile instruction (and _tile_release() after its last).
static void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

static inline void zero_products() {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
}

// One step of 32 bf16 along the reduced dimension: a0/a1 the A tiles' first elements (rows a_bytes apart), b0/b1
// the B tiles' (rows b_bytes apart).
static inline void product_step(const void* a0, const void* a1, int64_t a_bytes, const void* b0, const void* b1,
                                int64_t b_bytes) {
  _tile_loadd(0, a0, a_bytes);
  _tile_loadd(1, a1, a_bytes);
  _tile_loadd(2, b0, b_bytes);
  _tile_loadd(3, b1, b_bytes);
  _tile_dpbf16ps(4, 0, 2);
  _tile_dpbf16ps(5, 0, 3);
  _tile_dpbf16ps(6, 1, 2);
  _tile_dpbf16ps(7, 1, 3);
}

// The 32 x 32 float32 products to c (rows ld floats apart).
static inline void store_products(float* c, int64_t ld) {
  _tile_stored(4, c, 4 * ld);
  _tile_stored(5, c + 16, 4 * ld);
  _tile_stored(6, c + 16 * ld, 4 * ld);
  _tile_stored(7, c + 16 * ld + 16, 4 * ld);
}
