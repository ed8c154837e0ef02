// The lean forward's decoder stack in C++: the same ATen calls as fast.py's Python loop, minus
// the Python interpreter between them.
//
// A small model's forward on a CPU is ~2000 tiny tensor ops; in Python each costs a few
// microseconds of interpreter and binding overhead on top of its kernel. This file runs the same
// ops from C++, except two fused loops (RoPE + cache writes, the elementwise tail of RMSNorm)
// that round every intermediate exactly as ATen's elementwise ops do (compute in float, round
// to nearest even), so the output is bit-identical to fast.py's Python loop (a test checks it).
// It knows nothing of models: Python hands it the weights, the caches and the rotary rows.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define EAGLE2_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// float <-> element type, rounding as ATen does; written on raw bits so the compiler vectorizes
// the loops that use them (c10's scalar conversions branch per element).
template <typename T>
struct Num {
  static inline float f(T x) { return static_cast<float>(x); }
  static inline T r(float v) { return static_cast<T>(v); }
};

template <>
struct Num<c10::BFloat16> {
  static inline float f(c10::BFloat16 x) {
    const uint32_t u = static_cast<uint32_t>(x.x) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
  }
  static inline c10::BFloat16 r(float v) {  // round to nearest even; NaN -> 0x7FC0 (c10's rule)
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
    return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
  }
};

// x @ W.T + b through oneDNN's prepacked weight (kernels.py packs it), called boxed so that the
// op's exact C++ signature does not matter.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(b);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(c10::optional<std::string>());
  op.callBoxed(&stack);
  return stack.back().toTensor();
}


// ---- low-bit block weights on AMX ---------------------------------------------------------------
// A weight whose every block of 32 inputs is bf16(d * q + m) with fp16 d, m and a 4-bit q in 0..15
// (a Q4_1 GGUF dequantized), or bf16(d * q) with an 8-bit q in -127..127 (Q8_0), is stored as its
// codes plus scales: 0.625 or 1.0625 bytes per weight instead of 2. The kernel rebuilds exactly the
// bf16 weight (d * q is exact in fp32, so one fused multiply-add rounds once, as fp32 d * q + m
// does; then round to nearest even to bf16) into an AMX B tile and multiplies on the tile unit
// with fp32 accumulation, like oneDNN's bf16 kernel. kernels.py packs the records and checks the
// rebuilt weight bit for bit.
//
// Record per (16 outputs n0.., 32 inputs k0..): 16 rows of codes, then 16 fp16 d (and for 4 bits
// 16 fp16 m), one per output. Row r, element e (0..31) is W[n0 + e / 2][k0 + 2 r + e % 2] (the VNNI
// layout of a B tile). 4 bits: 16 bytes per row, byte j holds element j (low nibble) and j + 16
// (high nibble). 8 bits: 32 signed bytes per row.
constexpr int64_t Q4_RECORD = 16 * 16 + 32 + 32;
constexpr int64_t Q8_RECORD = 16 * 32 + 32;
template <int BITS> constexpr int64_t RECORD = BITS == 4 ? Q4_RECORD : Q8_RECORD;

#ifdef EAGLE2_AMX
// Two kernels, chosen at run time from CPUID (never from compile flags): the tile unit where the CPU has
// AMX-BF16, else AVX512-BF16's dot-product instruction (Zen 4, Ice Lake / Cooper Lake and later).
#define EAGLE2_BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")))
#define EAGLE2_AMX_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,amx-tile,amx-bf16")))

bool bf16_ready() {  // AVX512 F/DQ/BW/VL + BF16 + F16C on this CPU, and the OS saves the zmm state
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1) || !((c >> 29) & 1)) return false;  // OSXSAVE, F16C
    unsigned lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6u) != 0xE6u) return false;  // XMM, YMM, opmask, ZMM state enabled by the OS
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);  // AVX512 F, DQ, BW, VL
    if ((b & need) != need) return false;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);  // AVX512-BF16
  }();
  return ok;
}

bool amx_ready() {  // AMX-BF16 + AVX512-BF16 on this CPU, and the kernel let this process use the tiles
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!bf16_ready()) return false;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 accumulators (rows 0..15, 16..31 of x, 16 outputs, fp32); 2, 3 x rows (32 inputs,
// bf16); 4, 5 weights (double-buffered B tiles).
EAGLE2_AMX_FN void tiles_configure(int64_t rows) {
  TileConfig cfg;
  const int64_t r0 = std::min<int64_t>(rows, 16), r1 = rows - r0;
  cfg.rows[0] = cfg.rows[2] = static_cast<uint8_t>(r0);
  cfg.colsb[0] = cfg.colsb[2] = 64;
  if (r1 > 0) {
    cfg.rows[1] = cfg.rows[3] = static_cast<uint8_t>(r1);
    cfg.colsb[1] = cfg.colsb[3] = 64;
  }
  cfg.rows[4] = cfg.rows[5] = 16;
  cfg.colsb[4] = cfg.colsb[5] = 64;
  // the intrinsic does not tell the compiler that it reads cfg (GCC drops the stores): inline asm
  asm volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
}

EAGLE2_AMX_FN void tiles_release() { _tile_release(); }

// Decode steps stream the weights from memory: the kernels fetch records a few ahead of the one they
// unpack (12 records, ~3.5 KB: faster than 6 or 20 on a Zen 4 EPYC), so that loads overlap the arithmetic.
// A prefetch past the end of the weights is harmless: it never faults.
template <int BITS>
inline void prefetch_record(const uint8_t* rec) {  // baseline x86-64: callable from every kernel's ISA
  for (int64_t line = 0; line < RECORD<BITS>; line += 64) _mm_prefetch(reinterpret_cast<const char*>(rec + line), _MM_HINT_T0);
}

// A record's scales spread over the VNNI elements of a row (element e belongs to output e / 2).
struct Spread {
  __m512 d_lo, d_hi, m_lo, m_hi;
};

template <int BITS>
EAGLE2_BF16_FN inline Spread spread(const uint8_t* rec) {
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  // element e -> output e / 2
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  const uint8_t* scales = rec + 16 * 32 * BITS / 8;  // after the codes: 256 (4 bits) or 512 (8 bits) bytes
  const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
  Spread sp{_mm512_permutexvar_ps(lo_idx, dv), _mm512_permutexvar_ps(hi_idx, dv), _mm512_setzero_ps(),
            _mm512_setzero_ps()};
  if (BITS == 4) {
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32)));
    sp.m_lo = _mm512_permutexvar_ps(lo_idx, mv);
    sp.m_hi = _mm512_permutexvar_ps(hi_idx, mv);
  }
  return sp;
}

// Row r of a record as 32 bf16 weights (64 bytes of a B tile).
template <int BITS>
EAGLE2_BF16_FN inline __m512i unpack_row(const uint8_t* rec, const Spread& sp, int r) {
  if (BITS == 8) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 32 * r));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 32 * r + 16));
    const __m512 w_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), sp.d_lo);  // exact: 11 x 8 bits
    const __m512 w_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), sp.d_hi);
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w_hi, w_lo));
  }
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16 * r));
  const __m128i lo = _mm_and_si128(raw, nibble);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
  const __m512 w_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), sp.d_lo, sp.m_lo);
  const __m512 w_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), sp.d_hi, sp.m_hi);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w_hi, w_lo));
}

// One record -> the 16 x 32 bf16 B tile in `out` (1 KB, 64-byte rows).
template <int BITS>
EAGLE2_BF16_FN inline void unpack(const uint8_t* rec, uint16_t* out) {
  const Spread sp = spread<BITS>(rec);
  for (int r = 0; r < 16; ++r) _mm512_store_si512(out + 32 * r, unpack_row<BITS>(rec, sp, r));
}

// y[0:rows, 0:16] = x[0:rows, :] @ W[n0:n0+16, :].T (+ bias) for one group of 16 outputs; rows <= 32,
// tiles configured for `rows`. x rows are ldx elements apart, y rows ldy.
template <int BITS>
EAGLE2_AMX_FN void block_group(const uint16_t* x, int64_t ldx, int64_t rows, const uint8_t* recs, int64_t kblocks,
                            const uint16_t* bias, uint16_t* y, int64_t ldy) {
  alignas(64) uint16_t wbuf[2][16 * 32];
  alignas(64) float acc[32 * 16];
  const bool two = rows > 16;
  const uint16_t* x1 = x + 16 * ldx;
  const int64_t stride = ldx * 2;
  _tile_zero(0);
  if (two) _tile_zero(1);
  // Two weight buffers and B tiles: unpacking block kb + 1 need not wait for the tile load of block kb.
  // The empty asm statement is a compiler barrier: the tile intrinsics do not declare their memory use.
  // (A macro, not a function: the intrinsics take tile numbers as literal tokens.)
#define EAGLE2_BLOCK_STEP(TILE, BUF, KB)                     \
  unpack<BITS>(recs + (KB) * RECORD<BITS>, BUF);          \
  asm volatile("" : : : "memory");                        \
  _tile_loadd(TILE, BUF, 64);                             \
  _tile_loadd(2, x + (KB) * 32, stride);                  \
  _tile_dpbf16ps(0, 2, TILE);                             \
  if (two) {                                              \
    _tile_loadd(3, x1 + (KB) * 32, stride);               \
    _tile_dpbf16ps(1, 3, TILE);                           \
  }
  for (int64_t kb = 0; kb < kblocks; kb += 2) {
    EAGLE2_BLOCK_STEP(4, wbuf[0], kb)
    if (kb + 1 < kblocks) {
      EAGLE2_BLOCK_STEP(5, wbuf[1], kb + 1)
    }
  }
#undef EAGLE2_BLOCK_STEP
  _tile_stored(0, acc, 64);
  if (two) _tile_stored(1, acc + 256, 64);
  asm volatile("" : : : "memory");
  const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias))), 16));
  for (int64_t m = 0; m < rows; ++m) {
    __m512 v = _mm512_load_ps(acc + 16 * m);
    if (bias != nullptr) v = _mm512_add_ps(v, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// Inputs p[0], p[1] (a row's 2 r and 2 r + 1), broadcast to the 16 outputs. (Helpers, not lambdas: a
// lambda does not take its function's target attribute, so a build without global AVX-512 flags fails.)
EAGLE2_BF16_FN inline __m512bh input_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(v)));
}

// Row r of a record's weights: unpacked from the record (and kept in the group's buffer when STORE), or
// loaded from that buffer.
template <bool FROM_RECORDS, int BITS, bool STORE>
EAGLE2_BF16_FN inline __m512bh weight_row(const uint8_t* rec, const Spread& sp, uint16_t* w, int r) {
  if (!FROM_RECORDS) return reinterpret_cast<__m512bh>(_mm512_load_si512(w + 32 * r));
  const __m512i v = unpack_row<BITS>(rec, sp, r);
  if (STORE) _mm512_store_si512(w + 32 * r, v);
  return reinterpret_cast<__m512bh>(v);
}

// The same product without tiles, for CPUs with AVX512-BF16 but no AMX. Rows go through in chunks of
// R <= 6 whose accumulators stay in registers for the whole K. Each row sums in the same order whatever
// the chunk or the number of rows (row r of a record feeds accumulator r % 4, combined as
// (a0 + a1) + (a2 + a3) at the end), so every output row is bit-identical to the row computed alone:
// the kernel is row-invariant by construction. Four accumulators per row hide the dot instruction's
// latency on a single row (a decode step).
//
// The weights of a group come either straight from its records (FROM_RECORDS, each record unpacked
// once, in registers) or from `wbuf` (kblocks x 1 KB), which the first of several chunks fills as it
// unpacks (STORE): its arithmetic then overlaps the stream of records from memory, which a separate
// unpacking pass would leave idle.
template <int R, bool FROM_RECORDS, int BITS, bool STORE>
EAGLE2_BF16_FN inline void dot_rows(const uint8_t* recs, uint16_t* wbuf, int64_t kblocks, const uint16_t* x,
                                    int64_t ldx, const uint16_t* bias, uint16_t* y, int64_t ldy) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint8_t* rec = recs + kb * RECORD<BITS>;
    uint16_t* w = wbuf + kb * 512;
    const uint16_t* xk = x + kb * 32;
    Spread sp{};
    if (FROM_RECORDS) {
      prefetch_record<BITS>(rec + 12 * RECORD<BITS>);
      sp = spread<BITS>(rec);
    }
    for (int r = 0; r < 16; r += 4) {  // spelled out per accumulator: a computed index would keep them in memory
      const __m512bh w0 = weight_row<FROM_RECORDS, BITS, STORE>(rec, sp, w, r);
      const __m512bh w1 = weight_row<FROM_RECORDS, BITS, STORE>(rec, sp, w, r + 1);
      const __m512bh w2 = weight_row<FROM_RECORDS, BITS, STORE>(rec, sp, w, r + 2);
      const __m512bh w3 = weight_row<FROM_RECORDS, BITS, STORE>(rec, sp, w, r + 3);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        const uint16_t* xi = xk + i * ldx + 2 * r;
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], input_pair(xi), w0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], input_pair(xi + 2), w1);
        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], input_pair(xi + 4), w2);
        acc[i][3] = _mm512_dpbf16_ps(acc[i][3], input_pair(xi + 6), w3);
      }
    }
  }
  const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias))), 16));
  for (int i = 0; i < R; ++i) {
    __m512 v = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
    if (bias != nullptr) v = _mm512_add_ps(v, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

template <int BITS, bool FROM_RECORDS, bool STORE>
EAGLE2_BF16_FN void dot_chunk(int64_t rows, const uint8_t* recs, uint16_t* wbuf, int64_t kblocks,
                              const uint16_t* x, int64_t ldx, const uint16_t* bias, uint16_t* y, int64_t ldy) {
  switch (rows) {
    case 1: return dot_rows<1, FROM_RECORDS, BITS, STORE>(recs, wbuf, kblocks, x, ldx, bias, y, ldy);
    case 2: return dot_rows<2, FROM_RECORDS, BITS, STORE>(recs, wbuf, kblocks, x, ldx, bias, y, ldy);
    case 3: return dot_rows<3, FROM_RECORDS, BITS, STORE>(recs, wbuf, kblocks, x, ldx, bias, y, ldy);
    case 4: return dot_rows<4, FROM_RECORDS, BITS, STORE>(recs, wbuf, kblocks, x, ldx, bias, y, ldy);
    case 5: return dot_rows<5, FROM_RECORDS, BITS, STORE>(recs, wbuf, kblocks, x, ldx, bias, y, ldy);
    default: return dot_rows<6, FROM_RECORDS, BITS, STORE>(recs, wbuf, kblocks, x, ldx, bias, y, ldy);
  }
}

// y[0:rows, 0:16] = x[0:rows, :] @ W[n0:n0+16, :].T (+ bias) for one group of 16 outputs, any rows: in
// chunks of at most 6 rows, as even as they come (8 rows as 4 + 4: a 2-row chunk leaves the dot unit
// waiting on its few accumulators), the first one unpacking the records.
template <int BITS>
EAGLE2_BF16_FN void block_group_dp(const uint16_t* x, int64_t ldx, int64_t rows, const uint8_t* recs, int64_t kblocks,
                                   const uint16_t* bias, uint16_t* y, int64_t ldy, uint16_t* wbuf) {
  if (rows <= 6) return dot_chunk<BITS, true, false>(rows, recs, wbuf, kblocks, x, ldx, bias, y, ldy);
  const int64_t chunks = (rows + 5) / 6;
  for (int64_t c = 0, m0 = 0; c < chunks; ++c) {
    const int64_t n = (rows - m0) / (chunks - c);  // the remaining rows over the remaining chunks
    if (c == 0) {
      dot_chunk<BITS, true, true>(n, recs, wbuf, kblocks, x, ldx, bias, y, ldy);
    } else {
      dot_chunk<BITS, false, false>(n, recs, wbuf, kblocks, x + m0 * ldx, ldx, bias, y + m0 * ldy, ldy);
    }
    m0 += n;
  }
}

// ---- the same records for fp32 activations, on AVX2 + FMA (Zen 2 and every later x86 CPU) ----------
// Where bf16 is not native, dtype="auto" is fp32, whose weights stream 4 bytes each: reading the blocks
// instead (0.625 or 1.06 bytes) is what makes a decode step fast there. The product is factored by block:
// y[o] = sum over blocks b of d[o, b] * (sum over b's inputs of x * q) + m[o, b] * (sum over b's inputs of x),
// the same value as x @ W.T with W = d * q + m (kernels.py checks the records rebuild W bit for bit) up to
// fp32 rounding, in another order than MKL's fp32 product (the latitude oneDNN's packed fp32 linear takes).
// Factored, a weight costs one int-to-float conversion plus one multiply-add per row, where rebuilding d * q + m
// first took a second multiply-add on the same two ports, which bound a one-row step; in exchange each row pays
// a few operations per block. On a Zen 3 EPYC, SmolLM2's layers and lm_head against the rebuilt-weight kernel:
// 1-2 rows 12-16% faster, 3-7 rows about even, 16 rows 9% and 64 (a prefill chunk) 20% slower; decoding with
// eagle2 ~10% faster overall, since its draft levels and small trees are those few rows.
//
// A record row's 32 elements (16 outputs x inputs 2 r, 2 r + 1) are four 8-lane vectors; lane e of vector j
// takes the inputs of parity e % 2 for output 4 j + e / 2. Per block, each lane sums q * x over the block's 16
// record rows from zero; the two parities' sums of an output are then added (one horizontal add per pair of
// vectors: outputs in the order FOLD_ORDER), and the row's running sums become fma(block sum, d, sum), then
// fma(S, m, sum) with S the sum of the block's 32 inputs (4 bits; 8-bit blocks have no m). Every row sums in
// exactly this order whatever the number of rows in the call.
#define EAGLE2_AVX2_FN __attribute__((target("avx2,fma,f16c")))

bool avx2_ready() {  // AVX2, FMA, F16C on this CPU and the ymm state enabled by the OS
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned need = (1u << 12) | (1u << 27) | (1u << 28) | (1u << 29);  // FMA, OSXSAVE, AVX, F16C
    if ((c & need) != need) return false;
    unsigned lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x6u) != 0x6u) return false;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 5) & 1);  // AVX2
  }();
  return ok;
}

// Outputs in the order a horizontal add of vectors 0, 1 (then 2, 3) leaves them; a record's scales in that order:
// d (and m) of outputs FOLD_ORDER[0..7] in d[0], of FOLD_ORDER[8..15] in d[1].
constexpr int FOLD_ORDER[16] = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};

template <int BITS>
EAGLE2_AVX2_FN inline void folded_scales(const uint8_t* rec, __m256* d, __m256* m) {
  const uint8_t* scales = rec + 16 * 32 * BITS / 8;
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  for (int h = 0; h < (BITS == 4 ? 2 : 1); ++h) {
    __m256* out = h == 0 ? d : m;
    for (int v = 0; v < 2; ++v)
      out[v] = _mm256_permutevar8x32_ps(
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 32 * h + 16 * v))), order);
  }
  if (BITS == 8) m[0] = m[1] = _mm256_setzero_ps();  // no m in 8-bit records; add_block never reads it
}

// Row r of a record as its 32 codes in four float vectors (integers, exact). Each vector's 8 codes are widened
// to 32 bits straight from memory (one load-and-extend each, no shuffles of a 16-byte register first); a 4-bit
// row's byte j holds elements j and j + 16, so one widening of bytes 0..7 serves vectors 0 (low nibbles) and 2
// (high), of bytes 8..15 1 and 3.
template <int BITS>
EAGLE2_AVX2_FN inline void codes_f32(const uint8_t* rec, int r, __m256* w) {
  auto widen = [](const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); };
  __m256i q[4];
  if (BITS == 8) {
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtepi8_epi32(widen(rec + 32 * r + 8 * j));
  } else {
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    const __m256i lo = _mm256_cvtepu8_epi32(widen(rec + 16 * r)), hi = _mm256_cvtepu8_epi32(widen(rec + 16 * r + 8));
    q[0] = _mm256_and_si256(lo, nibble);
    q[1] = _mm256_and_si256(hi, nibble);
    q[2] = _mm256_srli_epi32(lo, 4);
    q[3] = _mm256_srli_epi32(hi, 4);
  }
  for (int j = 0; j < 4; ++j) w[j] = _mm256_cvtepi32_ps(q[j]);
}

// Inputs 2 r, 2 r + 1 of a row (at p), repeated over the lanes.
EAGLE2_AVX2_FN inline __m256 input_pair_f32(const float* p) {
  double pair;
  std::memcpy(&pair, p, 8);
  return _mm256_castpd_ps(_mm256_set1_pd(pair));
}

// Per row and block, the sum of the block's 32 inputs: [rows, kblocks]. One fixed order (lanes of 8 apart, then a
// tree over the 8 lanes), so a row's sums never depend on the call.
EAGLE2_AVX2_FN void block_sums_f32(const float* x, int64_t ldx, int64_t rows, int64_t kblocks, float* sums) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const float* p = x + i * ldx + kb * 32;
      alignas(32) float t[8];
      _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                       _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24))));
      sums[i * kblocks + kb] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
  }
}

// A block's lane sums (vectors 2 v, 2 v + 1) into a row's running output sums (folded vector v).
template <int BITS>
EAGLE2_AVX2_FN inline __m256 add_block(__m256 even_vec, __m256 odd_vec, __m256 d, __m256 m, __m256 s, __m256 sum) {
  sum = _mm256_fmadd_ps(_mm256_hadd_ps(even_vec, odd_vec), d, sum);
  return BITS == 4 ? _mm256_fmadd_ps(s, m, sum) : sum;
}

// A row's 16 outputs from its two folded vectors (+ bias).
EAGLE2_AVX2_FN inline void finish_row_f32(const float* folded, const float* bias, float* y) {
  for (int k = 0; k < 16; ++k) {
    const int o = FOLD_ORDER[k];
    y[o] = bias == nullptr ? folded[k] : folded[k] + bias[o];
  }
}

// R rows over all blocks, lane vectors J0 .. J0 + J - 1 of each record row (J0, J even), codes converted in
// registers; the rows' output sums (folded) in `acc`.
template <int R, int BITS, int J0, int J>
EAGLE2_AVX2_FN inline void dot_pass_f32(const uint8_t* recs, int64_t kblocks, const float* x, int64_t ldx,
                                        const float* sums, __m256 (*acc)[2]) {
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint8_t* rec = recs + kb * RECORD<BITS>;
    prefetch_record<BITS>(rec + 12 * RECORD<BITS>);
    __m256 block[R][4];
    for (int i = 0; i < R; ++i)
      for (int j = J0; j < J0 + J; ++j) block[i][j] = _mm256_setzero_ps();
    for (int r = 0; r < 16; ++r) {
      __m256 w[4];
      codes_f32<BITS>(rec, r, w);
      for (int i = 0; i < R; ++i) {
        const __m256 xp = input_pair_f32(x + i * ldx + kb * 32 + 2 * r);
        for (int j = J0; j < J0 + J; ++j) block[i][j] = _mm256_fmadd_ps(w[j], xp, block[i][j]);
      }
    }
    __m256 d[2], m[2];
    folded_scales<BITS>(rec, d, m);
    for (int i = 0; i < R; ++i) {
      const __m256 s = BITS == 4 ? _mm256_broadcast_ss(sums + i * kblocks + kb) : _mm256_setzero_ps();
      for (int v = J0 / 2; v < (J0 + J) / 2; ++v)
        acc[i][v] = add_block<BITS>(block[i][2 * v], block[i][2 * v + 1], d[v], m[v], s, acc[i][v]);
    }
  }
}

// Up to 7 rows over the whole K with the codes converted in registers: a decode step, a draft level, a small
// tree. From three rows on they go over the records twice, vectors 0-1 of each record row, then 2-3, so that
// their 2 R block sums stay in registers beside the codes and inputs (4 R would be spilled, each carrying its
// sum through memory). Every row still sums in the one order. Kept out of line: inlined into block_group_f32
// its 2-row loop ran ~10% slower (register allocation).
template <int R, int BITS>
EAGLE2_AVX2_FN __attribute__((noinline)) void dot_rows_f32(const uint8_t* recs, int64_t kblocks, const float* x,
                                                           int64_t ldx, const float* sums, const float* bias,
                                                           float* y, int64_t ldy) {
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 2; ++v) acc[i][v] = _mm256_setzero_ps();
  if constexpr (R <= 2) {
    dot_pass_f32<R, BITS, 0, 4>(recs, kblocks, x, ldx, sums, acc);
  } else {
    dot_pass_f32<R, BITS, 0, 2>(recs, kblocks, x, ldx, sums, acc);
    dot_pass_f32<R, BITS, 2, 2>(recs, kblocks, x, ldx, sums, acc);
  }
  for (int i = 0; i < R; ++i) {
    alignas(32) float folded[16];
    for (int v = 0; v < 2; ++v) _mm256_store_ps(folded + 8 * v, acc[i][v]);
    finish_row_f32(folded, bias, y + i * ldy);
  }
}

// Eight rows or more share one conversion of the codes (up to seven are faster converting in registers,
// dot_rows_f32; eight there spill). The codes are converted a chunk of F32_CHUNK blocks at a time into `wbuf` (16 KB: the rows
// then read them from L1, where the whole group, 36-98 KB on SmolLM2, would sit in L2), the chunk's scales
// into `scales`, and every row of a tile of up to F32_TILE rows consumes the chunk, three rows to a code
// load, before the next one is converted. A row's lanes wait in `held` between blocks.
constexpr int64_t F32_CHUNK = 8;
constexpr int64_t F32_TILE = 64;

// Rows i0 .. i0 + R - 1 of a tile over one converted chunk (blocks kc .. kc1 - 1).
template <int R, int BITS>
EAGLE2_AVX2_FN inline void chunk_rows_f32(const float* wbuf, const __m256 (*scales)[4], int64_t kc, int64_t kc1,
                                          const float* x, int64_t ldx, const float* sums, int64_t kblocks,
                                          float (*held)[16]) {
  for (int64_t kb = kc; kb < kc1; ++kb) {
    __m256 block[R][4];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < 4; ++j) block[i][j] = _mm256_setzero_ps();
    for (int r = 0; r < 16; ++r) {  // one code vector live at a time: 4 R sums + R inputs + 1 fit 16 registers at R = 3
      __m256 xp[R];
      for (int i = 0; i < R; ++i) xp[i] = input_pair_f32(x + i * ldx + kb * 32 + 2 * r);
      for (int j = 0; j < 4; ++j) {
        const __m256 w = _mm256_load_ps(wbuf + ((kb - kc) * 16 + r) * 32 + 8 * j);
        for (int i = 0; i < R; ++i) block[i][j] = _mm256_fmadd_ps(w, xp[i], block[i][j]);
      }
    }
    const __m256* sc = scales[kb - kc];
    for (int i = 0; i < R; ++i) {
      const __m256 s = BITS == 4 ? _mm256_broadcast_ss(sums + i * kblocks + kb) : _mm256_setzero_ps();
      for (int v = 0; v < 2; ++v) {
        const __m256 sum = add_block<BITS>(block[i][2 * v], block[i][2 * v + 1], sc[v], sc[2 + v], s,
                                           _mm256_load_ps(held[i] + 8 * v));
        _mm256_store_ps(held[i] + 8 * v, sum);
      }
    }
  }
}

template <int BITS>
EAGLE2_AVX2_FN void block_group_f32(const float* x, int64_t ldx, int64_t rows, const uint8_t* recs, int64_t kblocks,
                                    const float* sums, const float* bias, float* y, int64_t ldy, float* wbuf) {
  switch (rows) {
    case 1: return dot_rows_f32<1, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    case 2: return dot_rows_f32<2, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    case 3: return dot_rows_f32<3, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    case 4: return dot_rows_f32<4, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    case 5: return dot_rows_f32<5, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    case 6: return dot_rows_f32<6, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    case 7: return dot_rows_f32<7, BITS>(recs, kblocks, x, ldx, sums, bias, y, ldy);
    default: break;
  }
  alignas(32) float held[F32_TILE][16];
  __m256 scales[F32_CHUNK][4];  // per block of the chunk: d, then m, in the folded order
  for (int64_t t0 = 0; t0 < rows; t0 += F32_TILE) {
    const int64_t tile = std::min(F32_TILE, rows - t0);
    std::memset(held, 0, sizeof(float) * 16 * tile);
    for (int64_t kc = 0; kc < kblocks; kc += F32_CHUNK) {
      const int64_t kc1 = std::min(kblocks, kc + F32_CHUNK);
      for (int64_t kb = kc; kb < kc1; ++kb) {
        const uint8_t* rec = recs + kb * RECORD<BITS>;
        prefetch_record<BITS>(rec + 12 * RECORD<BITS>);
        folded_scales<BITS>(rec, scales[kb - kc], scales[kb - kc] + 2);
        for (int r = 0; r < 16; ++r) {
          __m256 w[4];
          codes_f32<BITS>(rec, r, w);
          for (int j = 0; j < 4; ++j) _mm256_store_ps(wbuf + ((kb - kc) * 16 + r) * 32 + 8 * j, w[j]);
        }
      }
      const float* xt = x + t0 * ldx;
      const float* st = sums == nullptr ? nullptr : sums + t0 * kblocks;
      // threes, then the rest as twos: a lone row's 4 sums cannot hide the FMA latency (4 = 2 + 2)
      const int64_t threes = tile % 3 == 1 && tile > 3 ? tile / 3 - 1 : tile / 3;
      int64_t i = 0;
      auto at = [&](int64_t i) { return st == nullptr ? nullptr : st + i * kblocks; };
      for (; i < 3 * threes; i += 3)
        chunk_rows_f32<3, BITS>(wbuf, scales, kc, kc1, xt + i * ldx, ldx, at(i), kblocks, held + i);
      for (; i + 2 <= tile; i += 2)
        chunk_rows_f32<2, BITS>(wbuf, scales, kc, kc1, xt + i * ldx, ldx, at(i), kblocks, held + i);
      if (i < tile) chunk_rows_f32<1, BITS>(wbuf, scales, kc, kc1, xt + i * ldx, ldx, at(i), kblocks, held + i);
    }
    for (int64_t i = 0; i < tile; ++i) finish_row_f32(held[i], bias, y + (t0 + i) * ldy);
  }
}
#else
bool bf16_ready() { return false; }
bool amx_ready() { return false; }
bool avx2_ready() { return false; }
#endif

// Which block kernel runs here for bf16 activations: "amx", "avx512_bf16", or "" (none); for fp32 ones
// "avx2" or "". Without one, kernels.py keeps the plain weights.
std::string block_isa() { return amx_ready() ? "amx" : bf16_ready() ? "avx512_bf16" : ""; }
std::string block_isa_f32() { return avx2_ready() ? "avx2" : ""; }

#ifdef EAGLE2_AMX
// The frame of the register kernels (AVX512-BF16, AVX2): x2 [M, K] contiguous in T's dtype, bias [N] in the
// same, one call of `group` per 16 outputs with a per-thread, 64-byte aligned buffer for one group's
// weights unpacked (kblocks records of 512 values).
template <typename T, typename Group>
at::Tensor run_groups(const at::Tensor& x2, const at::Tensor& recs, const c10::optional<at::Tensor>& bias, Group group) {
  const int64_t K = x2.size(1), M = x2.size(0), groups = recs.size(0), kblocks = recs.size(1), N = groups * 16;
  const int64_t rec = recs.size(2);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == x2.scalar_type() && b.numel() == N, "block_linear: bias must be [N] in x's dtype");
  }
  at::Tensor y = at::empty({M, N}, x2.options());
  const T* xp = reinterpret_cast<const T*>(x2.const_data_ptr());
  const T* bp = bias.has_value() ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr;
  const uint8_t* rp = recs.const_data_ptr<uint8_t>();
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    std::vector<T> buf(kblocks * 512 + 64 / sizeof(T));
    T* wbuf = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t g = g0; g < g1; ++g) {
      group(xp, K, M, rp + g * kblocks * rec, kblocks, bp == nullptr ? nullptr : bp + 16 * g, yp + 16 * g, N, wbuf);
    }
  });
  return y;
}
#endif

// x [..., K] @ W.T (+ bias [N]) -> [..., N] from W's records [N / 16, K / 32, R]; R (Q4_RECORD or Q8_RECORD)
// says the format. bf16 x (and bias) on AMX or AVX512-BF16; fp32 on AVX2.
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& recs, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(recs.scalar_type() == at::kByte && recs.dim() == 3 &&
              (recs.size(2) == Q4_RECORD || recs.size(2) == Q8_RECORD) && recs.is_contiguous() &&
              x.size(-1) == recs.size(1) * 32,
              "block_linear: x [..., K] and records [N / 16, K / 32, ", Q4_RECORD, " or ", Q8_RECORD, "] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "block_linear: bf16 or fp32 x expected");
  const bool f32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK(f32 ? avx2_ready() : bf16_ready(), "block_linear needs ", f32 ? "AVX2 + FMA in fp32" : "AVX512-BF16 in bf16",
              " (kernels.py only packs block weights where they are usable)");
#ifdef EAGLE2_AMX
  const int64_t K = x.size(-1), groups = recs.size(0), kblocks = recs.size(1), N = groups * 16, rec = recs.size(2);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  const bool q4 = rec == Q4_RECORD;
  if (f32) {
    std::vector<float> sums(q4 ? M * kblocks : 0);  // the 4-bit blocks' m multiplies each block's input sum
    if (q4) block_sums_f32(x2.const_data_ptr<float>(), K, M, kblocks, sums.data());
    const float* sp = q4 ? sums.data() : nullptr;
    auto group = [sp, q4](const float* x, int64_t ldx, int64_t rows, const uint8_t* r, int64_t kb,
                                   const float* b, float* y, int64_t ldy, float* wbuf) {
      (q4 ? &block_group_f32<4> : &block_group_f32<8>)(x, ldx, rows, r, kb, sp, b, y, ldy, wbuf);
    };
    return run_groups<float>(x2, recs, bias, group).view(sizes);
  }
  if (!amx_ready()) return run_groups<uint16_t>(x2, recs, bias, q4 ? &block_group_dp<4> : &block_group_dp<8>).view(sizes);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kBFloat16 && b.numel() == N, "block_linear: bias must be bf16 [N]");
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.const_data_ptr());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(b.const_data_ptr()) : nullptr;
  const uint8_t* rp = recs.const_data_ptr<uint8_t>();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  auto group = rec == Q4_RECORD ? &block_group<4> : &block_group<8>;
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < M; m0 += 32) {  // tile configuration is per thread
      const int64_t rows = std::min<int64_t>(32, M - m0);
      tiles_configure(rows);
      for (int64_t g = g0; g < g1; ++g) {
        group(xp + m0 * K, K, rows, rp + g * kblocks * rec, kblocks, bp == nullptr ? nullptr : bp + 16 * g,
              yp + m0 * N + 16 * g, N);
      }
    }
    tiles_release();
  });
  return y.view(sizes);
#else
  return at::Tensor();
#endif
}

// x @ W.T + b: the block-weight kernel for up to 32 rows (one unpacking of the weights) when the layer
// has records, else oneDNN's prepacked weight or plain ATen. Longer inputs (prefills) keep oneDNN:
// for 33-64 rows its kernel sums in another order, and its bf16 results then match transformers'
// bf16 forward more often (greedy texts identical to hf on MT-bench first turns: 0.94 vs 0.59).
//
// exact (row-invariant numerics, fast.py): every row must come out as it would in a call of any other row
// count from 1 to 64. oneDNN's bf16 product takes another kernel for a single row than for 2..64 rows (on
// SmolLM2's down projection 1 output in 576 differs in its last bit), so a 1-row input runs as two copies of
// its row; the block kernel computes each row alone on the tile unit, so it serves up to 64 rows (a whole
// tree verification) instead of 32, and never hands part of a verification to oneDNN.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, bool packed,
                  const c10::optional<at::Tensor>& recs, bool exact) {
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  if (recs.has_value() && rows <= (exact ? 64 : 32)) return block_linear(x, *recs, b);
  if (exact && rows == 1) {
    const at::Tensor one = x.reshape({1, x.size(-1)});
    at::Tensor y = linear(at::cat({one, one}, 0), w, b, packed, recs, true).narrow(0, 0, 1);
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = y.size(-1);
    return y.reshape(sizes);
  }
  return packed ? packed_linear(x, w, b) : at::linear(x, w, b);
}

// The ATen sequences the fused loops below replace (fast.py's _rms and _rotate + cache copies);
// used for many rows (prefill), where ATen's vectorized kernels are faster than the fused loops.
at::Tensor rms_aten(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean({-1}, true) + eps);
  return w * h.to(x.scalar_type());
}

at::Tensor rotate_aten(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rot = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rot * sin;
}

// transformers' LlamaRMSNorm: normalise in fp32, cast back, scale. The sum of squares is ATen's own
// reduction (its summation order is its own, so it is left to it); the squares before it (exact float
// products, as ATen's pow(x, 2) computes x * x) and everything after it — the mean's division, add
// eps, rsqrt, multiply, cast back, scale — are one pass each, rounding exactly as the ATen ops round
// (float math, round to nearest even), so the result is bit-identical to fast.py's _rms (tested).
// The passes replace the conversion, pow and division dispatches: a one-token step runs 2 L + 1 norms.
at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xc = x.contiguous();
  TORCH_CHECK(w.scalar_type() == xc.scalar_type() && w.is_contiguous() && w.numel() == xc.size(-1),
              "rms: the norm weight must be a contiguous [H] tensor of the input's dtype");
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  at::Tensor squares = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms_squares", [&] {
    const scalar_t* __restrict__ xp = xc.const_data_ptr<scalar_t>();
    float* __restrict__ sp = squares.data_ptr<float>();
    using N = Num<scalar_t>;
    for (int64_t i = 0; i < rows * n; ++i) {
      const float v = N::f(xp[i]);
      sp[i] = v * v;
    }
  });
  const at::Tensor sums = at::sum(squares, {-1}, false);  // [rows] fp32
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const float* vp = sums.const_data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float e = static_cast<float>(eps), count = static_cast<float>(n);
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float inv = 1.0f / std::sqrt(vp[r] / count + e);  // mean = sum / n, as ATen's mean divides
        const scalar_t* __restrict__ xr = xp + r * n;
        scalar_t* __restrict__ orow = op + r * n;
        using N = Num<scalar_t>;
        for (int64_t j = 0; j < n; ++j) {
          orow[j] = N::r(N::f(wp[j]) * N::f(N::r(N::f(xr[j]) * inv)));
        }
      }
    });
  });
  return out;
}

// x * cos + rotate_half(x) * sin for q and k, with k and v written straight into the cache: one
// pass instead of ~16 ATen calls. Each product and the sum are rounded to the tensor's dtype as
// ATen's elementwise ops round them (compute in float, round to nearest even), so the result is
// bit-identical to the Python loop's rotate + cache copies (tested).
// qkv: [B, T, (Hq + 2 Hkv) D] contiguous; cos, sin: [B, 1, T, D] contiguous; kc, vc: [B, Hkv, C, D].
// Returns q rotated, [B, Hq, T, D] (a view of [B, T, Hq, D] memory); writes kc, vc at cache index past .. past + T - 1.
at::Tensor rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc,
                    const at::Tensor& vc, int64_t past, int64_t hq, int64_t hk, int64_t d) {
  const int64_t b = qkv.size(0), t = qkv.size(1), heads = hq + 2 * hk, half = d / 2;
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == qkv.scalar_type()
              && sin.scalar_type() == qkv.scalar_type() && kc.scalar_type() == qkv.scalar_type()
              && vc.scalar_type() == qkv.scalar_type() && cos.numel() == b * t * d,
              "rope_qkv: qkv, cos, sin and the cache must be contiguous tensors of one dtype");
  at::Tensor q = at::empty({b, t, hq, d}, qkv.options());  // the layout ATen's ops give the Python loop's q
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_qkv", [&] {
    const scalar_t* src = qkv.const_data_ptr<scalar_t>();
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = kc.data_ptr<scalar_t>();
    scalar_t* vp = vc.data_ptr<scalar_t>();
    const int64_t kb = kc.stride(0), kh = kc.stride(1), kt = kc.stride(2);
    const int64_t vb = vc.stride(0), vh = vc.stride(1), vt = vc.stride(2);
    using N = Num<scalar_t>;
    auto mul = [](scalar_t x, scalar_t y) { return N::r(N::f(x) * N::f(y)); };
    auto add = [](scalar_t x, scalar_t y) { return N::r(N::f(x) + N::f(y)); };
    at::parallel_for(0, b * t * heads, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bt = r / heads, h = r % heads, bi = bt / t, ti = bt % t;
        const scalar_t* __restrict__ x = src + r * d;
        if (h >= hq + hk) {  // v: a plain copy into the cache
          scalar_t* out = vp + bi * vb + (h - hq - hk) * vh + (past + ti) * vt;
          std::memcpy(out, x, d * sizeof(scalar_t));
          continue;
        }
        scalar_t* __restrict__ out = h < hq ? qp + (bt * hq + h) * d : kp + bi * kb + (h - hq) * kh + (past + ti) * kt;
        const scalar_t* __restrict__ c = cp + bt * d;
        const scalar_t* __restrict__ s = sp + bt * d;
        for (int64_t j = 0; j < half; ++j) {
          out[j] = add(mul(x[j], c[j]), N::r(-N::f(mul(x[j + half], s[j]))));  // (-x2) * s == -(x2 * s), exactly
          out[j + half] = add(mul(x[j + half], c[j + half]), mul(x[j], s[j + half]));
        }
      }
    });
  });
  return q.transpose(1, 2);
}

// ---- row-invariant attention ----------------------------------------------------------------------
// One vector register of floats, as wide as the build's ISA (torch's detected capability picks the flags):
// GCC and Clang lower arithmetic on it to single instructions, so a loop over a few of them keeps its
// accumulators in registers. (A vector wider than the ISA's is lowered through memory: slower than scalar.)
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float VF __attribute__((vector_size(4 * kLanes)));
inline VF loadv(const float* p) { VF v; std::memcpy(&v, p, sizeof v); return v; }
inline void storev(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
// The weighted sum below keeps kPassHeads x kPassChunks accumulators in registers: 16 of AVX-512's 32,
// 8 of AVX2's 16.
constexpr int kPassHeads = kLanes == 16 ? 4 : 2, kPassChunks = 4;

// out[h][e] = sum over k < nk, in order, of p[h * ps + k] * rows[kept[k] * rs + e], for G query heads that share
// the rows, C vectors of dims at a time (dims past the last whole chunk one at a time): each row chunk is
// read once for the G heads (the rows of a long cache live in L2, whose bandwidth bounds this loop) and
// the G x C accumulators stay in registers. Per head and dim it is the scalar loop's operations in the
// scalar loop's order, so the result is the same bit for bit.
template <int G, int C>
void weighted_rows(const float* p, int64_t ps, const float* rows, int64_t rs, int64_t d, const int64_t* kept, int64_t nk,
                   float* out) {
  int64_t e0 = 0;
  for (; e0 + kLanes * C <= d; e0 += kLanes * C) {
    VF a[G][C] = {};
    for (int64_t k = 0; k < nk; ++k) {
      const float* r = rows + kept[k] * rs + e0;
      VF rc[C];
      for (int c = 0; c < C; ++c) rc[c] = loadv(r + kLanes * c);
      for (int h = 0; h < G; ++h) {
        const VF pk = VF{} + p[h * ps + k];
        for (int c = 0; c < C; ++c) a[h][c] = a[h][c] + pk * rc[c];
      }
    }
    for (int h = 0; h < G; ++h) {
      for (int c = 0; c < C; ++c) storev(out + h * d + e0 + kLanes * c, a[h][c]);
    }
  }
  for (; e0 < d; ++e0) {
    for (int h = 0; h < G; ++h) {
      float a = 0.0f;
      for (int64_t k = 0; k < nk; ++k) a += p[h * ps + k] * rows[kept[k] * rs + e0];
      out[h * d + e0] = a;
    }
  }
}

// Attention scores, eight keys at a time. A key's score q . k is summed in the one order every key shares,
// wherever it falls in a block or a call: lane l (0..7) adds q_e k_e over the dims e = l, l + 8, l + 16, ...
// in turn with fused multiply-adds (dims past D are zeros in both), then the lanes combine as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). Reading each key's row as it lies (D contiguous) needs no
// transposed copy of the keys, which cost more than the products on a one-token step.
constexpr int64_t kDotLanes = 8;

// out[j] = q . k_j for the 8 keys whose rows start at k + j * ks; q and the rows hold dp floats (dp a multiple of 8).
#if defined(EAGLE2_AMX) && defined(__AVX2__) && defined(__FMA__)
inline void dot8(const float* q, int64_t dp, const float* k, int64_t ks, float* out) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < dp; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + j * ks + c), a[j]);
  }
  // hadd(x, y) = x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7: two rounds leave key j's (l0+l1)+(l2+l3)
  // and (l4+l5)+(l6+l7) in the two 128-bit halves; the cross-half add finishes all eight keys at once.
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
#else
inline void dot8(const float* q, int64_t dp, const float* k, int64_t ks, float* out) {  // the same sums, lane by lane
  for (int j = 0; j < 8; ++j) {
    float l[8] = {};
    for (int64_t c = 0; c < dp; c += 8) {
      for (int e = 0; e < 8; ++e) l[e] = std::fma(q[c + e], k[j * ks + c + e], l[e]);
    }
    out[j] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
}
#endif

// exp(x) for x <= 0 in float: Cody-Waite reduction by ln 2 and a degree-7 Taylor polynomial (relative
// error ~2e-7, 0 below -87). Only +, -, * and conversions, which round the same in a vector lane as in a
// scalar (the build has -ffp-contract=off), so a value's exp does not depend on where it falls in a loop:
// ATen's kernels use a vector exp for the body of a row and libm's for its tail, and the tail moves with the
// row length. The vector form below takes a row's body, this one its tail.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;  // ln 2 = hi + lo, k * hi exact
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;  // 2^k, k in -126..0
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.0f ? 0.0f : p * scale;
}

// The same arithmetic on kLanes values at once (the compiler leaves a loop of the scalar one unvectorized:
// its branches), lane for lane the scalar function's operations, so either gives a value the same bits.
typedef int32_t VI __attribute__((vector_size(4 * kLanes)));
inline VF splat(float v) { return VF{} + v; }
inline VF exp_nonpositive(VF x) {
  const VF lo = splat(-87.0f), shift = splat(12582912.0f);
  const VF xc = x < lo ? lo : x;
  const VF kf = (xc * splat(1.44269504088896341f) + shift) - shift;
  const VF r = (xc - kf * splat(0.693145751953125f)) - kf * splat(1.428606765330187e-06f);
  VF p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const VI bits = (__builtin_convertvector(kf, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? VF{} : p * scale;
}

// p[i] = exp(p[i] - m) for i < n, p[i] <= m.
inline void exp_shifted(float* p, int64_t n, float m) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) storev(p + i, exp_nonpositive(loadv(p + i) - splat(m)));
  for (; i < n; ++i) p[i] = exp_nonpositive(p[i] - m);
}

// softmax(q k^T * scale + bias) v for T query rows (decode, verify and draft steps), with every row reduced
// in one order that depends only on the keys that row may see, never on T or on where masked columns sit.
// Hand-written because no torch kernel promises that: ATen's CPU flash attention blocks the keys by the
// call's key count (S = past + T, with the tree's masked columns), takes libm's exp for a block's tail
// columns and a vector exp for the rest, and its products switch kernels with the row count; a root row
// verified inside a 16-node tree then differs from the same token decoded alone (tools/row_invariance.py).
// The order, per (row, query head):
//   score_j = (q . k_j, summed as dot8 says) * scale + bias_j, in fp32, for every key j;
//   keep the keys whose bias is above half the dtype's lowest value (the additive mask's "may not attend"),
//   in key order; m = their max; p_i = exp(score_i - m); l = the 16 partial sums of p_i by i mod 16 (i:
//   the rank among kept keys), added in lane order; out_d = (sum over kept i, in order, of p_i v_id) / l,
//   rounded once to the dtype.
// Skipped columns take no part in any sum, so a tree node's row equals the row its token gets when decoded
// alone after the accepted path (same keys, same order).
// q: [B, Hq, T, D] with D contiguous; kc, vc: [B, Hkv, C, D] with D contiguous, the first s entries valid;
// bias: [B, 1, T, s] additive. Returns [B, Hq, T, D] (a view of [B, T, Hq, D] memory, like the fused RoPE's q).
at::Tensor exact_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bias,
                           int64_t s, double scale) {
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3), hk = kc.size(1), g = hq / hk;
  TORCH_CHECK(q.stride(3) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1 && kc.scalar_type() == q.scalar_type() &&
              vc.scalar_type() == q.scalar_type() && bias.scalar_type() == q.scalar_type() && bias.dim() == 4 &&
              bias.size(0) == b && bias.size(2) == t && bias.size(3) == s && kc.size(2) >= s && hq % hk == 0,
              "exact_attention: q [B, Hq, T, D], caches [B, Hkv, C, D] and bias [B, 1, T, S] of one dtype expected");
  at::Tensor out = at::empty({b, t, hq, d}, q.options());
  constexpr int64_t L = 16;  // lanes of the partial sums of p
  const int64_t dp = (d + kDotLanes - 1) / kDotLanes * kDotLanes;  // the head dim padded with zeros for dot8
  const int64_t sp = (s + kDotLanes - 1) / kDotLanes * kDotLanes;  // the keys padded to whole blocks of 8
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "exact_attention", [&] {
    using N = Num<scalar_t>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = kc.const_data_ptr<scalar_t>();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float sc = static_cast<float>(scale);
    const float cut = 0.5f * static_cast<float>(std::numeric_limits<scalar_t>::lowest());
    const int64_t ks = kc.stride(2), vs = vc.stride(2), bs = bias.stride(3);
    // fp32 caches with whole 8-float chunks per row are read where they lie (but for the last, partial block of
    // keys: the rows past s may lie past the cache); others (bf16, half, an odd head dim) are converted once per
    // (batch, kv head) into zero-padded float rows.
    const bool direct = std::is_same<scalar_t, float>::value && d % kDotLanes == 0;
    const int64_t full = direct ? s / kDotLanes * kDotLanes : sp;  // keys read from the rows; the rest from `tail`
    // Tasks: (batch, kv head, a chunk of query rows, a part of the kv head's g query heads), about two per
    // thread: rows split first, then (for a step of few rows, a decode's one) heads. A thread's consecutive
    // tasks of one kv head share one float copy of its keys and values (when one is needed).
    const int64_t groups = b * hk, want = 2 * at::get_num_threads();
    const int64_t chunks = std::min<int64_t>(t, std::max<int64_t>(1, (want + groups - 1) / groups));
    const int64_t per = (t + chunks - 1) / chunks;
    const int64_t parts = std::min<int64_t>(g, std::max<int64_t>(1, (want + groups * chunks - 1) / (groups * chunks)));
    const int64_t hper = (g + parts - 1) / parts;
    at::parallel_for(0, groups * chunks * parts, 1, [&](int64_t begin, int64_t end) {
      // Scratch, written before it is read (no zero-filling of ~0.5 MB per call on a long cache).
      std::unique_ptr<float[]> kconv(direct ? nullptr : new float[sp * dp]), vconv(direct ? nullptr : new float[s * d]);
      std::vector<float> tail(kDotLanes * dp), qf(g * dp, 0.0f), score(g * sp), prob(g * s), acc(g * d), total(g);
      std::vector<int64_t> kept(s);
      float part[L];
      const float *krows = nullptr, *vrows = nullptr;  // the group's key and value rows as floats
      int64_t kstride = dp, vstride = d;
      int64_t have = -1;  // the (batch, kv head) whose keys and values those point to
      for (int64_t task = begin; task < end; ++task) {
        const int64_t grp = task / (chunks * parts), bi = grp / hk, kh = grp % hk;
        const int64_t r0 = task / parts % chunks * per, r1 = std::min<int64_t>(t, r0 + per);
        const int64_t h0 = task % parts * hper, h1 = std::min<int64_t>(g, h0 + hper);
        if (r0 >= r1 || h0 >= h1) continue;
        if (have != grp) {
          have = grp;
          const scalar_t* kbase = kp + bi * kc.stride(0) + kh * kc.stride(1);
          const scalar_t* vbase = vp + bi * vc.stride(0) + kh * vc.stride(1);
          if (direct) {
            krows = reinterpret_cast<const float*>(kbase);
            vrows = reinterpret_cast<const float*>(vbase);
            kstride = ks;
            vstride = vs;
          } else {
            for (int64_t key = 0; key < s; ++key) {
              float* kf = kconv.get() + key * dp;
              float* vf = vconv.get() + key * d;
              for (int64_t e = 0; e < d; ++e) kf[e] = N::f(kbase[key * ks + e]);
              for (int64_t e = d; e < dp; ++e) kf[e] = 0.0f;
              for (int64_t e = 0; e < d; ++e) vf[e] = N::f(vbase[key * vs + e]);
            }
            std::fill(kconv.get() + s * dp, kconv.get() + sp * dp, 0.0f);
            krows = kconv.get();
            vrows = vconv.get();
          }
          std::fill(tail.begin(), tail.end(), 0.0f);  // keys full .. s - 1, then zero keys up to sp
          for (int64_t key = full; key < s; ++key) std::memcpy(&tail[(key - full) * dp], krows + key * kstride, d * 4);
        }
        for (int64_t ti = r0; ti < r1; ++ti) {
          for (int64_t h = h0; h < h1; ++h) {
            const scalar_t* qr = qp + bi * q.stride(0) + (kh * g + h) * q.stride(1) + ti * q.stride(2);
            for (int64_t e = 0; e < d; ++e) qf[h * dp + e] = N::f(qr[e]);  // dims d .. dp - 1 stay 0
            float* srow = score.data() + h * sp;
            for (int64_t j = 0; j < full; j += kDotLanes) dot8(&qf[h * dp], dp, krows + j * kstride, kstride, srow + j);
            if (full < sp) dot8(&qf[h * dp], dp, tail.data(), dp, srow + full);
          }
          const scalar_t* brow = bp + bi * bias.stride(0) + ti * bias.stride(2);
          int64_t nk = 0;  // the keys this row may see, in order
          for (int64_t j = 0; j < s; ++j) {
            if (N::f(brow[j * bs]) > cut) kept[nk++] = j;
          }
          // kept is increasing with kept[i] >= i, so kept[i] == i holds for a leading run of i: its length, by bisection.
          int64_t run = 0;
          for (int64_t lo = 0, hi = nk; lo < hi;) {
            const int64_t mid = (lo + hi) / 2;
            if (kept[mid] == mid) {
              run = mid + 1;
              lo = mid + 1;
            } else {
              hi = mid;
            }
          }
          for (int64_t h = h0; h < h1; ++h) {
            const float* srow = score.data() + h * sp;
            float* ph = prob.data() + h * s;
            float mx[4] = {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
            // The leading keys a row may see are usually 0, 1, 2, ... (the cached prefix): read them as a run
            // (vectorized), the rest (a tree row's ancestors) through `kept`. Same sums either way.
            for (int64_t i = 0; i < run; ++i) ph[i] = srow[i] * sc + N::f(brow[i * bs]);
            for (int64_t i = run; i < nk; ++i) ph[i] = srow[kept[i]] * sc + N::f(brow[kept[i] * bs]);
            // Their max in kLanes running maxima, vector registers (the max is exact in any order; a scalar
            // loop with an array of maxima keeps them in memory, a store-to-load chain per key).
            int64_t i0 = 0;
            if (nk >= kLanes) {
              VF mv = loadv(ph);
              for (i0 = kLanes; i0 + kLanes <= nk; i0 += kLanes) {
                const VF v = loadv(ph + i0);
                mv = v > mv ? v : mv;
              }
              for (int l = 0; l < kLanes; ++l) mx[l & 3] = std::max(mx[l & 3], mv[l]);
            }
            for (; i0 < nk; ++i0) mx[i0 & 3] = std::max(mx[i0 & 3], ph[i0]);
            const float m = std::max(std::max(mx[0], mx[1]), std::max(mx[2], mx[3]));
            exp_shifted(ph, nk, m);
            std::fill(part, part + L, 0.0f);  // l: 16 partial sums by rank mod 16, added in lane order
            int64_t i = 0;
            for (; i + L <= nk; i += L) {
              for (int64_t l = 0; l < L; ++l) part[l] += ph[i + l];
            }
            for (int64_t l = 0; i + l < nk; ++l) part[l] += ph[i + l];
            total[h] = 0.0f;
            for (int64_t l = 0; l < L; ++l) total[h] += part[l];
          }
          // out_d = sum over kept keys in order of p v_d, one dim per lane (weighted_rows), up to kPassHeads
          // heads per pass over the rows.
          for (int64_t h = h0; h < h1;) {
            const int64_t nq = std::min<int64_t>(kPassHeads, h1 - h);
            const float* ph = prob.data() + h * s;
            float* ah = acc.data() + h * d;
            if (nq >= 4) weighted_rows<4, kPassChunks>(ph, s, vrows, vstride, d, kept.data(), nk, ah);
            else if (nq == 3) weighted_rows<3, kPassChunks>(ph, s, vrows, vstride, d, kept.data(), nk, ah);
            else if (nq == 2) weighted_rows<2, kPassChunks>(ph, s, vrows, vstride, d, kept.data(), nk, ah);
            else weighted_rows<1, kPassChunks>(ph, s, vrows, vstride, d, kept.data(), nk, ah);
            h += nq;
          }
          for (int64_t h = h0; h < h1; ++h) {
            scalar_t* orow = op + ((bi * t + ti) * hq + kh * g + h) * d;
            for (int64_t e = 0; e < d; ++e) orow[e] = N::r(nk > 0 ? acc[h * d + e] / total[h] : 0.0f);  // no key: 0
          }
        }
      }
    });
  });
  return out.transpose(1, 2);
}

// The MLP activations decoder_forward computes, by code. native.py maps a model's activation name to one of
// these names and reads the code from ``activation_codes``, so the table lives here only.
enum Act : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

at::Tensor activation(const at::Tensor& x, int64_t act) {
  if (act == kSilu) return at::silu(x);
  return at::gelu(x, act == kGelu ? "none" : "tanh");
}

// One decoder layer as decoder_forward takes it: kLayerSlots tensors in this order, each slot that may be
// absent (|None) passed as None. native.LayerTensors names the same fields in the same order; native.py
// reads ``layer_layout`` at load and refuses a build whose names differ, so the two cannot drift apart.
enum Slot : int64_t {
  kInputNorm,     // input RMSNorm weight [H] | None (EAGLE's draft layer has none)
  kQkv,           // fused q/k/v weight [(Hq + 2 Hkv) D, H] (oneDNN-packed when ``packed``)
  kQkvBias,       // its bias | None
  kO,             // output projection [H, Hq D]
  kOBias,         // its bias | None
  kPostNorm,      // post-attention RMSNorm weight [H]
  kGateUp,        // fused gate/up weight [2 I, H]
  kDown,          // down projection [H, I]
  kQkvBlocks,     // low-bit block records of qkv | None (kernels.py)
  kOBlocks,       // ... of o | None
  kGateUpBlocks,  // ... of gate_up | None
  kDownBlocks,    // ... of down | None
  kLayerSlots
};
const char* const kSlotNames[] = {"input_norm", "qkv",  "qkv_bias",   "o",        "o_bias",         "post_norm",
                                  "gate_up",    "down", "qkv_blocks", "o_blocks", "gate_up_blocks", "down_blocks"};
static_assert(sizeof(kSlotNames) / sizeof(kSlotNames[0]) == kLayerSlots, "one name per layer slot");

std::vector<std::string> layer_layout() { return std::vector<std::string>(std::begin(kSlotNames), std::end(kSlotNames)); }

std::map<std::string, int64_t> activation_codes() {
  return {{"silu", kSilu}, {"gelu", kGelu}, {"gelu_tanh", kGeluTanh}};
}

}  // namespace

// The rest of a layer once its attention is computed: x + o(attn) [B, T, H], then the MLP block with
// its residual. fused: the fused RMSNorm (steps of up to 64 rows), else ATen's.
at::Tensor layer_tail(const at::Tensor& x, const at::Tensor& attn, const c10::optional<at::Tensor>* w, int64_t inter,
                      int64_t act, bool packed, bool exact, bool fused, double eps) {
  at::Tensor y = x + linear(attn, *w[kO], w[kOBias], packed, w[kOBlocks], exact);
  at::Tensor h = fused ? rms(y, *w[kPostNorm], eps) : rms_aten(y, *w[kPostNorm], eps);
  at::Tensor gu = linear(h, *w[kGateUp], c10::nullopt, packed, w[kGateUpBlocks], exact);
  return y + linear(activation(gu.slice(-1, 0, inter), act) * gu.slice(-1, inter), *w[kDown], c10::nullopt, packed,
                    w[kDownBlocks], exact);
}

// x: [B, T, H] layer input; cos, sin: [B, 1, T, D]; bias: [B, 1, T, S] additive mask (S = past + T);
// weights: kLayerSlots per layer, in Slot order (native.LayerTensors); k_cache, v_cache: [L, B, Hkv, C, D],
// written at past..S-1; act: an Act code; exact: row-invariant numerics for steps of up to 64 rows
// (exact_attention, linear's 1-row rule); attn_input: [B, T, H'] what the first layer's attention reads
// instead of its (normed) input, or None: an EAGLE-3 midlayer attends over [embedding, feature] (2 H wide)
// while its residual stream x stays H wide.
// Returns the last layer's output, after final_norm unless it is None, [B, T, H].
at::Tensor decoder_forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias,
                           const std::vector<c10::optional<at::Tensor>>& weights,
                           const c10::optional<at::Tensor>& final_norm,
                           at::Tensor k_cache, at::Tensor v_cache, int64_t past, int64_t hq, int64_t hk, int64_t d,
                           int64_t inter, double eps, double scale, bool packed, int64_t act, bool exact,
                           const c10::optional<at::Tensor>& attn_input) {
  c10::InferenceMode guard;
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const int64_t b = x.size(0), t = x.size(1), s = past + t, g = hq / hk;
  TORCH_CHECK(weights.size() % kLayerSlots == 0, "decoder_forward: ", kLayerSlots, " tensors per layer (layer_layout), got ",
              weights.size());
  const int64_t n_layers = static_cast<int64_t>(weights.size() / kLayerSlots);
  const bool fused = b * t <= 64;  // decode, verify and draft steps; a prefill takes ATen's kernels
  auto norm = [&](const at::Tensor& v, const at::Tensor& weight) { return fused ? rms(v, weight, eps) : rms_aten(v, weight, eps); };
  for (int64_t i = 0; i < n_layers; ++i) {
    const auto* w = &weights[kLayerSlots * i];
    at::Tensor h = i == 0 && attn_input.has_value() ? *attn_input
                   : w[kInputNorm].has_value()         ? norm(x, *w[kInputNorm])
                                                       : x;  // EAGLE's draft layer has no input norm
    at::Tensor qkv = linear(h, *w[kQkv], w[kQkvBias], packed, w[kQkvBlocks], exact);  // [B, T, (Hq + 2 Hkv) D]
    at::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);  // [B, Hkv, C, D]
    at::Tensor q;  // [B, Hq, T, D], with k and v written to the cache at past ..
    if (fused) {
      q = rope_qkv(qkv.contiguous(), cos_c, sin_c, kc, vc, past, hq, hk, d);
    } else {
      auto parts = qkv.split_with_sizes({hq * d, hk * d, hk * d}, -1);
      q = rotate_aten(parts[0].view({b, t, hq, d}).transpose(1, 2), cos, sin);
      kc.slice(2, past, s).copy_(rotate_aten(parts[1].view({b, t, hk, d}).transpose(1, 2), cos, sin));
      vc.slice(2, past, s).copy_(parts[2].view({b, t, hk, d}).transpose(1, 2));
    }
    at::Tensor o;  // [B, Hq, T, D]
    if (fused && exact) {
      o = exact_attention(q, kc, vc, bias, s, scale);
    } else {
      at::Tensor keys = kc.slice(2, 0, s), vals = vc.slice(2, 0, s);  // [B, Hkv, S, D]
      o = at::scaled_dot_product_attention(q, keys, vals, bias, 0.0, false, scale, g > 1);
    }
    x = layer_tail(x, o.transpose(1, 2).reshape({b, t, hq * d}), w, inter, act, packed, exact, fused, eps);
  }
  return final_norm.has_value() ? norm(x, *final_norm) : x;
}

// Several sequences' steps in one pass over the weights, for a server decoding them side by side.
// x: [1, R, H], sequence j's t_j rows after sequence j-1's, R = sum t_j <= 64; cos, sin: [1, 1, R, D];
// for each sequence j: bias[j] [1, 1, t_j, past_j + t_j] additive, k_caches[j], v_caches[j] [L, 1, Hkv, C, D]
// written at past_j .. past_j + t_j - 1. Other arguments as decoder_forward's, always exact.
// The projections and the MLP take all R rows in one call, so the weights are read once for every
// sequence (reading them is most of a small step's time); RoPE, the cache writes and attention run
// per sequence against its own cache. The linears are row-invariant and exact_attention reduces each
// row over the keys it may see, so every row is bit for bit the row decoder_forward gives when its
// sequence runs alone (tested). Returns [1, R, H], after final_norm unless it is None.
at::Tensor decoder_forward_multi(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                                 const std::vector<at::Tensor>& bias, const std::vector<at::Tensor>& k_caches,
                                 const std::vector<at::Tensor>& v_caches, const std::vector<int64_t>& pasts,
                                 const std::vector<c10::optional<at::Tensor>>& weights,
                                 const c10::optional<at::Tensor>& final_norm, int64_t hq, int64_t hk, int64_t d,
                                 int64_t inter, double eps, double scale, bool packed, int64_t act,
                                 const c10::optional<at::Tensor>& attn_input) {
  c10::InferenceMode guard;
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const int64_t r = x.size(1), seqs = static_cast<int64_t>(bias.size());
  TORCH_CHECK(x.size(0) == 1 && r <= 64 && seqs > 0 && static_cast<int64_t>(k_caches.size()) == seqs &&
              static_cast<int64_t>(v_caches.size()) == seqs && static_cast<int64_t>(pasts.size()) == seqs &&
              weights.size() % kLayerSlots == 0,
              "decoder_forward_multi: x [1, R <= 64, H] and one bias, cache pair and past per sequence expected");
  int64_t total = 0;
  for (const auto& bj : bias) total += bj.size(2);
  TORCH_CHECK(total == r, "decoder_forward_multi: the sequences' rows (", total, ") must add up to x's (", r, ")");
  const int64_t n_layers = static_cast<int64_t>(weights.size() / kLayerSlots);
  for (int64_t i = 0; i < n_layers; ++i) {
    const auto* w = &weights[kLayerSlots * i];
    at::Tensor h = i == 0 && attn_input.has_value() ? *attn_input
                   : w[kInputNorm].has_value()         ? rms(x, *w[kInputNorm], eps)
                                                       : x;
    at::Tensor qkv = linear(h, *w[kQkv], w[kQkvBias], packed, w[kQkvBlocks], true);  // [1, R, (Hq + 2 Hkv) D]
    std::vector<at::Tensor> outs;  // each sequence's attention output, [1, t_j, Hq, D]
    for (int64_t j = 0, r0 = 0; j < seqs; ++j) {
      const int64_t t = bias[j].size(2), s = pasts[j] + t;
      at::Tensor kc = k_caches[j].select(0, i), vc = v_caches[j].select(0, i);  // [1, Hkv, C, D]
      at::Tensor q = rope_qkv(qkv.slice(1, r0, r0 + t).contiguous(), cos_c.slice(2, r0, r0 + t).contiguous(),
                              sin_c.slice(2, r0, r0 + t).contiguous(), kc, vc, pasts[j], hq, hk, d);
      outs.push_back(exact_attention(q, kc, vc, bias[j], s, scale).transpose(1, 2));
      r0 += t;
    }
    x = layer_tail(x, at::cat(outs, 1).reshape({1, r, hq * d}), w, inter, act, packed, true, true, eps);
  }
  return final_norm.has_value() ? rms(x, *final_norm, eps) : x;
}

// The compute functions run with the GIL released, so other Python threads (a server's event loop)
// keep running during a forward: a long prefill is one call. pybind11 converts the arguments to
// ATen values before the guard releases the GIL and converts the result after it is taken back, so
// nothing in between touches a Python object; the tensors stay alive through the caller's references.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("decoder_forward", &decoder_forward, "the lean decoder stack (see fast.py)", release());
  m.def("decoder_forward_multi", &decoder_forward_multi,
        "several sequences' steps in one pass over the weights, each against its own cache (see fast.py)", release());
  m.def("rms", &rms, "fused RMSNorm (bit-identical to fast._rms)", release());
  m.def("rms_aten", &rms_aten, "RMSNorm as ATen ops", release());
  m.def("block_linear", &block_linear, "x @ W.T (+ b) from 4- or 8-bit block records (AMX or AVX512-BF16)",
        release());
  m.def("linear", &linear, "x @ W.T (+ b): the block kernel for up to 32 rows (exact: 64), else oneDNN / ATen",
        release());
  m.def("exact_attention", &exact_attention, "row-invariant attention over a static cache (see exact_attention)",
        release());
  m.def("amx_ready", &amx_ready, "whether block_linear runs on the AMX tile unit here");
  m.def("block_isa", &block_isa, "the bf16 block kernel that runs here: amx, avx512_bf16, or empty (none)");
  m.def("block_isa_f32", &block_isa_f32, "the fp32 block kernel that runs here: avx2, or empty (none)");
  m.def("layer_layout", &layer_layout, "the names of decoder_forward's tensors per layer, in order");
  m.def("activation_codes", &activation_codes, "activation name -> decoder_forward's act code");
}
