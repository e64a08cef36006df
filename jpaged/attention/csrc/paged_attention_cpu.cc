// Paged attention for the CPU and the write of each step's K/V into the pool: two XLA FFI
// custom calls (jpaged/attention/cpu.py builds and registers them). Same pool layout as the `xla` backend: per block and KV head, K is stored
// transposed [head_dim, block_size] and V [block_size, head_dim], so a page's scores are one
// vector of block_size keys per head_dim step and its values one vector of head_dim per key.
//
// Why a kernel: XLA on the CPU materialises every gathered page before its dot and runs the
// page loop's small fusions one after another; here each page is read once, straight from
// the pool, by the queries (and the GQA group of heads) that need it.
//
// Keys are read 16 at a time (a chunk: one vector row of 16 keys per head_dim step, the unit
// of page_tile), so any power-of-two block size works: a 16-token block is one chunk and a
// larger one several, read in place (K's rows block_size apart); blocks of 1-8 tokens are
// copied, 16 / block_size of them, into one chunk in the thread's scratch (what tiny blocks
// cost). head_dim 16, 32, 64, 96, 128 or 256; `supported()` in cpu.py sends other shapes to
// the `xla` backend.
// Work items are (sequence, tile of queries, KV heads), shared out over XLA's intra-op
// threads by parallel_for (jpaged/ops/csrc/parallel.h).
//
// The write (JpagedWriteKV) stores new K/V straight into the donated pool, its outputs
// aliased to its inputs: XLA's CPU scatter into a bfloat16 pool goes through a float32 copy
// of the whole pool, so without it the pool had to stay float32 and attention read twice
// the bytes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileQueries = 8;  // queries of one sequence per work item
constexpr int64_t kChunk = 16;    // keys per page_tile
// How far ahead chunks are prefetched. On a Zen 3 (AVX2) 0 to 8 16-token pages measured the
// same within noise: decode attention there reads ~9 GB/s either way.
constexpr int64_t kPrefetchChunks = 2;

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as XLA's convert does; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

struct Problem {
  const float* q;        // [N, H, D]
  const char* k_pool;    // [L, NB, KV, D, bs]
  const char* v_pool;    // [L, NB, KV, bs, D]
  int64_t elem_size;     // 4 (float32) or 2 (bfloat16)
  int64_t layer, num_blocks, kv_heads, block_size, head_dim, heads;
  const int32_t* block_tables;  // [B, P]
  int64_t max_pages;
  const int32_t* context_lens;     // [B]
  const int32_t* query_start_loc;  // [B + 1]
  float scale;
  float* out;  // [N, H, D]
};

// Queries first .. first + count of sequence `seq`, KV heads head0 .. head1.
struct Item {
  int32_t seq, first, count, head0, head1;
};

// One thread's working set; row r = (query r / G, member r % G of the KV head's group).
// k, v: one chunk of one KV head gathered from blocks smaller than a chunk (bytes enough for
// float32; bfloat16 uses half).
struct Scratch {
  std::vector<float> q, acc, m, l, k, v;
  std::vector<int64_t> visible;
  void reserve(int64_t rows, int64_t D) {
    if (static_cast<int64_t>(m.size()) < rows) {
      q.resize(rows * D); acc.resize(rows * D); m.resize(rows); l.resize(rows); visible.resize(rows);
    }
  }
  void reserve_chunk(int64_t D) {  // only blocks under 16 keys need it: a call allocates anew
    if (static_cast<int64_t>(k.size()) < kChunk * D) { k.resize(kChunk * D); v.resize(kChunk * D); }
  }
};

inline void prefetch(const char* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

constexpr int KVEC = kChunk / VW;  // vectors per chunk row of 16 keys

// exp for x <= 0 (scores minus their running max): 2^n * p(r), |r| <= ln2/2, n rounded
// with the 1.5 * 2^23 trick (std::nearbyint would keep it scalar). Everything here is on the
// native vector: a wider GCC vector is split into scalar compares and blends on AVX2.
inline vf expv(vf x) {
  const vf lo = vf{} - 87.0f;
  x = x < lo ? lo : x;
  const vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < VW; ++i) m = std::max(m, x[i]);
  return m;
}

inline float hsum(vf x) {
  float s = 0.0f;
  for (int i = 0; i < VW; ++i) s += x[i];
  return s;
}

inline float exp_scalar(float x) { return expv(vf{} + x)[0]; }  // exp(-inf) = 0

// Rows r0 .. r0 + R (R <= 4) of one head over one chunk: scores, online softmax, values.
// q, acc: [rows, D] float32; k: [D, 16] with rows ks apart and v: [16, D] of element type T
// (float or bfloat16 bits); visible[r]: keys of the chunk row r sees. Scores keep 8
// independent FMA chains (rows x key vectors, x 2 over d with AVX-512); values run over D in
// chunks of two vectors so the accumulators stay in registers. Always inlined: GCC outlined
// the decode path's page_tile<3> once attend_item held two chunk loops (2-4% slower).
template <int R, int D, typename T>
__attribute__((always_inline)) inline void page_tile(const float* q, const T* k, int64_t ks,
                                                     const T* v, const int64_t* visible,
                                                     float* m, float* l, float* acc) {
  constexpr int CH = KVEC == 1 ? 2 : 1;
  vf s[R][KVEC][CH] = {};
  for (int d = 0; d < D; d += CH)
    for (int c = 0; c < CH; ++c) {
      vf kj[KVEC];
      for (int j = 0; j < KVEC; ++j) kj[j] = loadv(k + (d + c) * ks + j * VW);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < KVEC; ++j) s[r][j][c] += q[r * D + d + c] * kj[j];
    }
  vf lane;
  for (int i = 0; i < VW; ++i) lane[i] = static_cast<float>(i);
  alignas(64) float e[R][kChunk];
  float correction[R];
  for (int r = 0; r < R; ++r) {
    vf sr[KVEC], seen[KVEC];
    vf mxv = vf{} - 1e30f;
    for (int j = 0; j < KVEC; ++j) {
      vf sum = s[r][j][0];
      for (int c = 1; c < CH; ++c) sum += s[r][j][c];
      seen[j] = (lane + static_cast<float>(j * VW)) < static_cast<float>(visible[r]) ? vf{} + 1.0f : vf{};
      sr[j] = seen[j] > 0.0f ? sum : vf{} - 1e30f;
      mxv = sr[j] > mxv ? sr[j] : mxv;
    }
    const float mx = std::max(m[r], hmax(mxv));
    vf total = vf{};
    for (int j = 0; j < KVEC; ++j) {
      const vf ej = expv(sr[j] - mx) * seen[j];
      total += ej;
      storev(e[r] + j * VW, ej);
    }
    correction[r] = exp_scalar(m[r] - mx);  // 0 at the first page (m = -inf)
    l[r] = l[r] * correction[r] + hsum(total);
    m[r] = mx;
  }
  // Only keys some row sees: the rest of a chunk may hold stale values (even NaN) that a
  // zero weight would not cancel.
  int64_t keys = 0;
  for (int r = 0; r < R; ++r) keys = std::max(keys, visible[r]);
  constexpr int NV = D / VW;            // vectors per row of values
  constexpr int CW = NV % 2 ? 1 : 2;     // vectors per chunk (head_dim 16 on AVX-512: one)
  for (int c0 = 0; c0 < NV; c0 += CW) {
    vf a[R][CW];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CW; ++c) a[r][c] = loadv(acc + r * D + (c0 + c) * VW) * correction[r];
    for (int t = 0; t < keys; ++t) {
      vf vt[CW];
      for (int c = 0; c < CW; ++c) vt[c] = loadv(v + t * D + (c0 + c) * VW);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < CW; ++c) a[r][c] += e[r][t] * vt[c];
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CW; ++c) storev(acc + r * D + (c0 + c) * VW, a[r][c]);
  }
}

// n blocks of BS < 16 keys (at element offsets `blocks` in the pools, one KV head) side by
// side as one chunk: k [D, 16], v [16, D]. Out of line: the hot loops stay small.
template <int BS, int D, typename T>
__attribute__((noinline)) void gather_chunk(const T* k_pool, const T* v_pool, const int64_t* blocks,
                                            int64_t n, T* k, T* v) {
  for (int64_t i = 0; i < n; ++i) {
    const T* src = k_pool + blocks[i];
    for (int d = 0; d < D; ++d)
      for (int t = 0; t < BS; ++t) k[d * kChunk + i * BS + t] = src[d * BS + t];
    std::memcpy(v + i * BS * D, v_pool + blocks[i], sizeof(T) * BS * D);
  }
}

template <int D, typename T>
void attend_item(const Problem& p, const Item& it, Scratch& sc) {
  const int64_t bs = p.block_size, bs_log2 = __builtin_ctzll(bs);  // a power of two
  // Row r of head h: query r / G, member r % G; heads of the item lie side by side in the
  // scratch (hr = h - head0) so one chunk of the sequence is read for all of them at once:
  // a block's KV heads are contiguous in the pool, one sequential read instead of several.
  const int64_t G = p.heads / p.kv_heads, rows = it.count * G, nh = it.head1 - it.head0;
  sc.reserve(nh * rows, D);
  float* q = sc.q.data();
  float* acc = sc.acc.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  int64_t* visible = sc.visible.data();
  if (bs < kChunk) sc.reserve_chunk(D);
  T* k_chunk = reinterpret_cast<T*>(sc.k.data());
  T* v_chunk = reinterpret_cast<T*>(sc.v.data());
  const int32_t q_start = p.query_start_loc[it.seq];
  const int32_t q_len = p.query_start_loc[it.seq + 1] - q_start;
  const int32_t first_pos = p.context_lens[it.seq] - q_len + it.first;
  const int64_t keys_seen = first_pos + it.count;  // by the item's last query
  const int64_t chunks = (keys_seen - 1) / kChunk + 1;
  const int64_t pages = (keys_seen - 1) / bs + 1;  // blocks read: no table entry past them
  const int32_t* table = p.block_tables + it.seq * p.max_pages;
  const int64_t page_elems = D * bs, page_bytes = page_elems * sizeof(T);
  const T* k_pool = reinterpret_cast<const T*>(p.k_pool);
  const T* v_pool = reinterpret_cast<const T*>(p.v_pool);
  auto row_ptr = [&](const float* base, int64_t h, int64_t r) {
    return base + ((q_start + it.first + r / G) * p.heads + h * G + r % G) * D;
  };
  for (int64_t hr = 0; hr < nh; ++hr)
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = row_ptr(p.q, it.head0 + hr, r);
      float* qr = q + (hr * rows + r) * D;
      for (int64_t d = 0; d < D; ++d) qr[d] = src[d] * p.scale;
      for (int64_t d = 0; d < D; ++d) acc[(hr * rows + r) * D + d] = 0.0f;
      m[hr * rows + r] = -INFINITY;
      l[hr * rows + r] = 0.0f;
    }
  auto page_offset = [&](int64_t page, int64_t h) {  // in elements
    return ((p.layer * p.num_blocks + table[page]) * p.kv_heads + h) * page_elems;
  };
  // Chunk c starts at key c * 16: in block `page` at column `col` (bs >= 16), or it is blocks
  // page .. page + chunk_pages(page) (bs < 16; none past the last block read).
  const int64_t pages_per_chunk = std::max<int64_t>(1, kChunk >> bs_log2);
  auto chunk_pages = [&](int64_t page) { return std::min(pages_per_chunk, pages - page); };
  // One loop per way of reading a chunk (if constexpr): the 16-token path has no gather in it.
  auto run = [&](auto in_place_tag) {
    constexpr bool in_place = decltype(in_place_tag)::value;
    auto prefetch_chunk = [&](int64_t c) {  // K and V of every head of the item
      const int64_t page = (c * kChunk) >> bs_log2, col = (c * kChunk) & (bs - 1);
      if (in_place && bs > kChunk) {  // 16 columns of each K row, 16 rows of V, per head
        for (int64_t hr = 0; hr < nh; ++hr) {
          const int64_t base = page_offset(page, it.head0 + hr);
          for (int64_t d = 0; d < D; ++d)
            prefetch(reinterpret_cast<const char*>(k_pool + base + d * bs + col), kChunk * sizeof(T));
          prefetch(reinterpret_cast<const char*>(v_pool + base + col * D), kChunk * D * sizeof(T));
        }
        return;
      }
      for (int64_t i = 0, n = chunk_pages(page); i < n; ++i) {  // whole blocks, the item's heads in one run
        prefetch(reinterpret_cast<const char*>(k_pool + page_offset(page + i, it.head0)), nh * page_bytes);
        prefetch(reinterpret_cast<const char*>(v_pool + page_offset(page + i, it.head0)), nh * page_bytes);
      }
    };
    for (int64_t c = 1; c < std::min<int64_t>(kPrefetchChunks, chunks); ++c) prefetch_chunk(c);
    for (int64_t c = 0; c < chunks; ++c) {
      // A later chunk, while this one computes.
      if (c + kPrefetchChunks < chunks) prefetch_chunk(c + kPrefetchChunks);
      // Rows are in query order: the first ones may come before this chunk and see none of it.
      int64_t r0 = rows;
      for (int64_t i = rows - 1; i >= 0; --i) {
        visible[i] = std::min<int64_t>(kChunk, first_pos + i / G - c * kChunk + 1);
        if (visible[i] > 0) r0 = i;
      }
      const int64_t page = (c * kChunk) >> bs_log2, col = (c * kChunk) & (bs - 1);
      for (int64_t hr = 0; hr < nh; ++hr) {
        const T *k = k_chunk, *v = v_chunk;
        int64_t ks = kChunk;
        if constexpr (in_place) {
          const int64_t base = page_offset(page, it.head0 + hr);
          k = k_pool + base + col;
          v = v_pool + base + col * D;
          ks = bs;
        } else {
          int64_t blocks[kChunk];
          const int64_t n = chunk_pages(page);
          for (int64_t i = 0; i < n; ++i) blocks[i] = page_offset(page + i, it.head0 + hr);
          switch (bs) {
            case 1: gather_chunk<1, D, T>(k_pool, v_pool, blocks, n, k_chunk, v_chunk); break;
            case 2: gather_chunk<2, D, T>(k_pool, v_pool, blocks, n, k_chunk, v_chunk); break;
            case 4: gather_chunk<4, D, T>(k_pool, v_pool, blocks, n, k_chunk, v_chunk); break;
            default: gather_chunk<8, D, T>(k_pool, v_pool, blocks, n, k_chunk, v_chunk); break;
          }
        }
        const int64_t o = hr * rows;
        int64_t r = r0;
        for (; r + 4 <= rows; r += 4)
          page_tile<4, D, T>(q + (o + r) * D, k, ks, v, &visible[r], m + o + r, l + o + r, acc + (o + r) * D);
        switch (rows - r) {
          case 3: page_tile<3, D, T>(q + (o + r) * D, k, ks, v, &visible[r], m + o + r, l + o + r, acc + (o + r) * D); break;
          case 2: page_tile<2, D, T>(q + (o + r) * D, k, ks, v, &visible[r], m + o + r, l + o + r, acc + (o + r) * D); break;
          case 1: page_tile<1, D, T>(q + (o + r) * D, k, ks, v, &visible[r], m + o + r, l + o + r, acc + (o + r) * D); break;
          default: break;
        }
      }
    }
  };
  if (bs >= kChunk) run(std::true_type{});
  else run(std::false_type{});
  for (int64_t hr = 0; hr < nh; ++hr)
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = const_cast<float*>(row_ptr(p.out, it.head0 + hr, r));
      const int64_t i = hr * rows + r;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[i * D + d] * inv;
    }
}

template <typename T>
void attend_item_typed(const Problem& p, const Item& it, Scratch& sc) {
  switch (p.head_dim) {
    case 16: attend_item<16, T>(p, it, sc); break;
    case 32: attend_item<32, T>(p, it, sc); break;
    case 64: attend_item<64, T>(p, it, sc); break;
    case 96: attend_item<96, T>(p, it, sc); break;
    case 128: attend_item<128, T>(p, it, sc); break;
    default: attend_item<256, T>(p, it, sc); break;  // 256, checked
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pool,
                          ffi::AnyBuffer v_pool, ffi::Buffer<ffi::S32> layer,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> context_lens,
                          ffi::Buffer<ffi::S32> query_start_loc, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k_pool.dimensions();
  auto td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged attention: q [N, H, D], pools [L, blocks, KV, bs, D], tables [B, P]");
  auto dtype = k_pool.element_type();
  if (dtype != v_pool.element_type() || (dtype != ffi::F32 && dtype != ffi::BF16))
    return ffi::Error::InvalidArgument("paged attention: pools must both be float32 or bfloat16");
  Problem p;
  p.q = q.typed_data();
  p.k_pool = static_cast<const char*>(k_pool.untyped_data());
  p.v_pool = static_cast<const char*>(v_pool.untyped_data());
  p.elem_size = dtype == ffi::BF16 ? 2 : 4;
  p.layer = layer.typed_data()[0];
  p.num_blocks = kd[1];
  p.kv_heads = kd[2];
  p.block_size = kd[3];
  p.head_dim = kd[4];
  p.heads = qd[1];
  p.block_tables = block_tables.typed_data();
  p.max_pages = td[1];
  p.context_lens = context_lens.typed_data();
  p.query_start_loc = query_start_loc.typed_data();
  p.scale = scale;
  p.out = out->typed_data();
  if (qd[2] != p.head_dim || p.heads % p.kv_heads)
    return ffi::Error::InvalidArgument("paged attention: q's heads or head_dim do not match the pool");
  if (p.block_size < 1 || (p.block_size & (p.block_size - 1)) ||
      (p.head_dim != 16 && p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 96 &&
       p.head_dim != 128 && p.head_dim != 256))
    return ffi::Error::InvalidArgument("paged attention: needs a power-of-two block_size and head_dim "
                                       "16/32/64/96/128/256");
  std::memset(p.out, 0, sizeof(float) * qd[0] * qd[1] * qd[2]);  // padding tokens: zeros

  std::vector<Item> items;
  const int64_t B = td[0];
  // A sequence's KV heads lie side by side in each block: one item reads them together,
  // unless there are too few sequences to keep every thread busy.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t tiles = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t q_len = p.query_start_loc[b + 1] - p.query_start_loc[b];
    if (q_len > 0 && p.context_lens[b] > 0) tiles += (q_len + kTileQueries - 1) / kTileQueries;
  }
  const int32_t head_step = tiles >= 4 * threads ? static_cast<int32_t>(p.kv_heads) : 1;
  for (int32_t b = 0; b < B; ++b) {
    const int32_t q_len = p.query_start_loc[b + 1] - p.query_start_loc[b];
    if (q_len <= 0 || p.context_lens[b] <= 0) continue;
    // The pages read must exist: a bad table is an error, not a read outside the pool.
    const int64_t pages = (p.context_lens[b] + p.block_size - 1) / p.block_size;
    if (q_len > p.context_lens[b] || pages > p.max_pages || p.query_start_loc[b + 1] > qd[0])
      return ffi::Error::InvalidArgument("paged attention: a sequence's context exceeds its block table");
    for (int64_t i = 0; i < pages; ++i) {
      const int32_t block = p.block_tables[b * p.max_pages + i];
      if (block < 0 || block >= p.num_blocks)
        return ffi::Error::InvalidArgument("paged attention: block id outside the pool");
    }
    // Longest-reaching tiles first, so the tail of the schedule is short.
    for (int32_t first = ((q_len - 1) / kTileQueries) * kTileQueries; first >= 0; first -= kTileQueries)
      for (int32_t h = 0; h < p.kv_heads; h += head_step)
        items.push_back({b, first, std::min(kTileQueries, q_len - first), h,
                               static_cast<int32_t>(std::min<int64_t>(h + head_step, p.kv_heads))});
  }
  parallel_for(pool, static_cast<int64_t>(items.size()), [&] {
    return [&, scratch = std::make_unique<Scratch>()](int64_t i) {
      if (p.elem_size == 2) attend_item_typed<uint16_t>(p, items[i], *scratch);
      else attend_item_typed<float>(p, items[i], *scratch);
    };
  });
  return ffi::Error::Success();
}


// ---- the K/V write ------------------------------------------------------------------------

// Element i of a [N, KV, D] float32 or bfloat16 buffer, as float32.
inline float element(const void* base, bool bf16, int64_t i) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

inline void store(void* base, bool bf16, int64_t i, float x) {
  if (bf16) static_cast<uint16_t*>(base)[i] = f32_to_bf16(x);
  else static_cast<float*>(base)[i] = x;
}

// k, v [N, KV, D] into layer `layer` of the pools at slot_mapping[n] = block * bs + offset
// (K transposed inside a block, as above); slots outside the pool (padding: -1) are dropped.
ffi::Error WriteKV(ffi::AnyBuffer k_pool, ffi::AnyBuffer v_pool, ffi::Buffer<ffi::S32> layer,
                   ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> slot_mapping,
                   ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  auto pd = k_pool.dimensions();
  auto kd = k.dimensions();
  if (pd.size() != 5 || kd.size() != 3 || v_pool.dimensions().size() != 5 || v.dimensions().size() != 3)
    return ffi::Error::InvalidArgument("write_kv: pools [L, blocks, KV, bs, D], k and v [N, KV, D]");
  const int64_t L = pd[0], NB = pd[1], KV = pd[2], bs = pd[3], D = pd[4], N = kd[0];
  for (int i = 0; i < 5; ++i)
    if (v_pool.dimensions()[i] != pd[i]) return ffi::Error::InvalidArgument("write_kv: K and V pools differ");
  for (int i = 0; i < 3; ++i)
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("write_kv: k and v differ");
  if (kd[1] != KV || kd[2] != D || static_cast<int64_t>(slot_mapping.element_count()) != N)
    return ffi::Error::InvalidArgument("write_kv: k/v [N, KV, D] and slot_mapping [N] must match the pool");
  auto pool_type = k_pool.element_type(), in_type = k.element_type();
  auto ok = [](ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; };
  if (!ok(pool_type) || v_pool.element_type() != pool_type || !ok(in_type) || v.element_type() != in_type)
    return ffi::Error::InvalidArgument("write_kv: pools and k/v must be float32 or bfloat16");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("write_kv: layer outside the pool");
  const bool pool_bf16 = pool_type == ffi::BF16, in_bf16 = in_type == ffi::BF16;
  void* kp = k_out->untyped_data();
  void* vp = v_out->untyped_data();
  // Aliased, the outputs are the pools; should XLA ever hand over other buffers, start from a copy.
  if (kp != k_pool.untyped_data()) std::memcpy(kp, k_pool.untyped_data(), k_pool.size_bytes());
  if (vp != v_pool.untyped_data()) std::memcpy(vp, v_pool.untyped_data(), v_pool.size_bytes());
  const int32_t* slots = slot_mapping.typed_data();
  const void* ks = k.untyped_data();
  const void* vs = v.untyped_data();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t slot = slots[n];
    if (slot < 0 || slot >= NB * bs) continue;
    const int64_t block = slot / bs, offset = slot % bs;
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t page = ((l * NB + block) * KV + h) * bs * D, src = (n * KV + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        store(kp, pool_bf16, page + d * bs + offset, element(ks, in_bf16, src + d));
        store(vp, pool_bf16, page + offset * D + d, element(vs, in_bf16, src + d));
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedWriteKV, WriteKV,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
