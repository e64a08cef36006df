// y[M, N] = x[M, K] @ W on the CPU, with W packed once at load time into panels of 16 output
// columns, [N / 16, K, 16] (float32 or bfloat16): an XLA FFI custom call (jpaged/ops/matmul.py
// packs, builds and registers it).
//
// Why a kernel: XLA's CPU dots (YNNPACK or Eigen) repack the weights on every call, so a
// decode step, whose few rows make it a stream of weights, read them at 6-8 GB/s against the
// 20+ GB/s the memory gives. A packed panel is one contiguous stream, read from memory once
// and multiplied there with every row of x: a register tile of R rows x 16 columns
// accumulates over all of K, broadcasting one x element per row and k.
//
// bfloat16 panels widen to float32 in registers (exactly: their bits are a float32's top
// half), so they are read at half the bytes; the sums are float32 either way.
//
// `rows` (an int32 scalar) is how many leading rows of x are real: a step's token and
// sequence counts are padded to a few compiled sizes, and padding rows cost nothing here
// (their rows of y are zero), so a 138-token step in a 192-token bucket multiplies 138 rows.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // output columns per panel (jpaged/ops/matmul.py: PANEL)

// A tile holds 12 accumulators: 6 rows of two vectors with AVX2 (16 registers), 12 rows of one
// with AVX-512.
constexpr int KVEC = kPanel / VW;   // vectors per panel row
constexpr int kRows = 12 / KVEC;    // rows of x per register tile

// Rows 0..R-1 of x times one panel w [K, 16] -> y (row stride ldy), or added to y (`add`: a
// later slice of K). x is rows of stride ldx, or with `Packed` a packed tile (`pack_tile`):
// element (r, k) at x[k * kRows + r]. Accumulator i is row i / KVEC, vector i % KVEC;
// named, not an array, because GCC keeps an array of vectors in memory and stores it back on
// every k.
template <int R, typename T, bool Packed = false>
inline void tile(const float* x, int64_t ldx, const T* w, int64_t K, float* y, int64_t ldy, bool add) {
  vf c0{}, c1{}, c2{}, c3{}, c4{}, c5{}, c6{}, c7{}, c8{}, c9{}, c10{}, c11{};
  if (add) {
#define JPAGED_LOAD(i) \
    if constexpr (i < R * KVEC) c##i = loadv<float>(y + (i / KVEC) * ldy + (i % KVEC) * VW);
    JPAGED_LOAD(0) JPAGED_LOAD(1) JPAGED_LOAD(2) JPAGED_LOAD(3) JPAGED_LOAD(4) JPAGED_LOAD(5)
    JPAGED_LOAD(6) JPAGED_LOAD(7) JPAGED_LOAD(8) JPAGED_LOAD(9) JPAGED_LOAD(10) JPAGED_LOAD(11)
#undef JPAGED_LOAD
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = w + k * kPanel;
    __builtin_prefetch(wk + 64 * kPanel);  // 64 rows ahead: the panel streams from memory
    const vf b0 = loadv<T>(wk);
    const vf b1 = KVEC > 1 ? loadv<T>(wk + (KVEC - 1) * VW) : b0;
#define JPAGED_STEP(i)                                                      \
    if constexpr (i < R * KVEC) {                                           \
      const vf a = broadcast(Packed ? x + k * kRows + i / KVEC : x + (i / KVEC) * ldx + k); \
      c##i += a * ((i % KVEC) ? b1 : b0);  /* an FMA: -ffp-contract=fast */               \
    }
    JPAGED_STEP(0) JPAGED_STEP(1) JPAGED_STEP(2) JPAGED_STEP(3) JPAGED_STEP(4) JPAGED_STEP(5)
    JPAGED_STEP(6) JPAGED_STEP(7) JPAGED_STEP(8) JPAGED_STEP(9) JPAGED_STEP(10) JPAGED_STEP(11)
#undef JPAGED_STEP
  }
#define JPAGED_STORE(i) \
  if constexpr (i < R * KVEC) storev(y + (i / KVEC) * ldy + (i % KVEC) * VW, c##i);
  JPAGED_STORE(0) JPAGED_STORE(1) JPAGED_STORE(2) JPAGED_STORE(3) JPAGED_STORE(4) JPAGED_STORE(5)
  JPAGED_STORE(6) JPAGED_STORE(7) JPAGED_STORE(8) JPAGED_STORE(9) JPAGED_STORE(10) JPAGED_STORE(11)
#undef JPAGED_STORE
}

// Rows [0, rows) of x times panel w, rows <= kRows: one tile of that many rows.
template <typename T, bool Packed = false, int R = kRows>
inline void rest(int64_t rows, const float* x, int64_t ldx, const T* w, int64_t K, float* y, int64_t ldy,
                 bool add) {
  if constexpr (R > 0) {
    if (rows == R) tile<R, T, Packed>(x, ldx, w, K, y, ldy, add);
    else rest<T, Packed, R - 1>(rows, x, ldx, w, K, y, ldy, add);
  }
}

// Blocking for many rows (prefill), as BLIS blocks for Zen: rows of x in blocks of kBlockRows
// (12 tiles: 72 rows with AVX2, 144 with AVX-512) and K in slices of kSliceK. A block's slice
// of x is packed tile by tile (`pack_tile`) into the thread's scratch, which stays in L2; a
// panel's slice (256 x 16) stays in L1 while every tile of the block multiplies it. Packed, a
// tile reads its x as one sequential stream (strided rows ran the same loop at about 0.85x).
// One block of rows whose x fits L2 (decode) reads each panel once, whole, straight from
// memory, and x in place: the weights are the stream there.
constexpr int64_t kBlockRows = 12 * kRows;
constexpr int64_t kSliceK = 256;

// Rows [m, m + rows) of x [., K], columns [k0, k0 + kn) -> xp [kn][kRows] (missing rows 0).
inline void pack_tile(const float* x, int64_t K, int64_t m, int64_t rows, int64_t k0, int64_t kn, float* xp) {
  for (int64_t r = 0; r < kRows; ++r) {
    const float* xr = x + (m + r) * K + k0;
    if (r < rows)
      for (int64_t k = 0; k < kn; ++k) xp[k * kRows + r] = xr[k];
    else
      for (int64_t k = 0; k < kn; ++k) xp[k * kRows + r] = 0.0f;
  }
}

// Rows [m0, m1) of x [M, K] times panels [p0, p1) of w -> y [M, N].
template <typename T>
void block(const float* x, int64_t m0, int64_t m1, int64_t K, const T* w, int64_t p0, int64_t p1,
           float* y, int64_t N) {
  // One block's packed slice, per thread for its lifetime (XLA's pool threads live long): a
  // buffer per call would be allocated and cleared for every decode-sized dot too.
  static thread_local std::vector<float> buffer(kBlockRows * kSliceK);
  float* scratch = buffer.data();
  // Every tile of the block times the slice [k0, k0 + kn) of panel p; x read in place, or
  // (`packed`) from this slice's packed tiles in `scratch`.
  auto tiles = [&](auto packed, int64_t k0, int64_t kn, int64_t p) {
    constexpr bool kPacked = decltype(packed)::value;
    const T* wp = w + (p * K + k0) * kPanel;
    for (int64_t m = m0; m < m1; m += kRows) {
      const int64_t r = std::min<int64_t>(kRows, m1 - m);
      const float* xt = kPacked ? scratch + (m - m0) * kn : x + m * K + k0;
      float* yp = y + m * N + p * kPanel;
      if (r == kRows) tile<kRows, T, kPacked>(xt, K, wp, kn, yp, N, k0 > 0);
      else rest<T, kPacked>(r, xt, K, wp, kn, yp, N, k0 > 0);
    }
  };
  if (m1 - m0 <= kBlockRows && (m1 - m0) * K <= kBlockRows * kSliceK * 4) {
    for (int64_t p = p0; p < p1; ++p) tiles(std::false_type{}, 0, K, p);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSliceK) {
    const int64_t kn = std::min(kSliceK, K - k0);
    for (int64_t m = m0; m < m1; m += kRows)
      pack_tile(x, K, m, std::min<int64_t>(kRows, m1 - m), k0, kn, scratch + (m - m0) * kn);
    for (int64_t p = p0; p < p1; ++p) tiles(std::true_type{}, k0, kn, p);
  }
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                        ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("packed matmul: x [M, K] and packed weights [N / 16, K, 16]");
  if (wd[1] != xd[1]) return ffi::Error::InvalidArgument("packed matmul: x's K differs from the weights'");
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("packed matmul: rows must be one int32");
  const auto dtype = w.element_type();
  if (dtype != ffi::F32 && dtype != ffi::BF16)
    return ffi::Error::InvalidArgument("packed matmul: weights must be float32 or bfloat16");
  const float* xs = x.typed_data();
  const void* ws = w.untyped_data();
  float* ys = y->typed_data();
  const bool bf16 = dtype == ffi::BF16;
  const int64_t P = wd[0], N = P * kPanel, K = xd[1];
  // Real rows; with K = 0 none to multiply: every row of y is zero, as padding rows are.
  const int64_t M = K == 0 ? 0 : std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  std::memset(ys + M * N, 0, sizeof(float) * (xd[0] - M) * N);
  if (M == 0 || P == 0) return ffi::Error::Success();
  // Items are (a block of rows, a range of panels) of near-equal work, a multiple of the
  // threads in number: a last item of a few rows (512 rows: 7 blocks of 72 and one of 8) left
  // a core idle for most of an item.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = (M + kRows - 1) / kRows;  // register tiles of rows
  int64_t blocks = (tiles + 11) / 12;              // blocks of at most 12 tiles (kBlockRows rows)
  int64_t chunks = 1;
  if (blocks >= 2 * threads) {
    blocks = (blocks + threads - 1) / threads * threads;
  } else {
    chunks = std::min(P, (4 * threads + blocks - 1) / blocks);
    while (chunks < P && (blocks * chunks) % threads) ++chunks;
  }
  parallel_for(pool, blocks * chunks, [&] {
    return [&](int64_t i) {
      const int64_t b = i / chunks, c = i % chunks;
      const int64_t m0 = std::min(M, tiles * b / blocks * kRows), m1 = std::min(M, tiles * (b + 1) / blocks * kRows);
      const int64_t p0 = P * c / chunks, p1 = P * (c + 1) / chunks;
      if (m0 >= m1 || p0 >= p1) return;
      if (bf16) block(xs, m0, m1, K, static_cast<const uint16_t*>(ws), p0, p1, ys, N);
      else block(xs, m0, m1, K, static_cast<const float*>(ws), p0, p1, ys, N);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
