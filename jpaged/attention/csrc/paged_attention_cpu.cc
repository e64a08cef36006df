// Paged attention for the CPU, an XLA FFI custom call (jpaged/cpu_attention.py builds and
// registers it). Same pool layout as the `xla` backend: per block and KV head, K is stored
// transposed [head_dim, block_size] and V [block_size, head_dim], so a page's scores are one
// vector of block_size keys per head_dim step and its values one vector of head_dim per key.
//
// Why a kernel: XLA on the CPU materialises every gathered page before its dot and runs the
// page loop's small fusions one after another; here each page is read once, straight from
// the pool, by the queries (and the GQA group of heads) that need it.
//
// Shapes: block_size 16 (a page's keys are one vector of 16 floats) and head_dim 32, 64,
// 96, 128 or 256; `supported()` in cpu_attention.py sends other shapes to the `xla` backend.
// Work items are (sequence, tile of queries, KV heads); the calling thread and XLA's
// intra-op threads take them from one atomic counter.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileQueries = 8;  // queries of one sequence per work item

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
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
struct Scratch {
  std::vector<float> q, acc, m, l, k_f32, v_f32;
  std::vector<int64_t> visible;
  void reserve(int64_t rows, int64_t D, int64_t bs) {
    if (static_cast<int64_t>(m.size()) < rows) {
      q.resize(rows * D); acc.resize(rows * D); m.resize(rows); l.resize(rows); visible.resize(rows);
    }
    if (static_cast<int64_t>(k_f32.size()) < D * bs) { k_f32.resize(D * bs); v_f32.resize(D * bs); }
  }
};

inline void prefetch(const char* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

// Registers hold tiles of up to 4 rows; each row keeps two partial sums of its scores and
// head_dim / 16 vectors of its output, so the dots are many short independent chains
// instead of one long one.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 load16(const float* p) { v16 x; std::memcpy(&x, p, sizeof(x)); return x; }
inline void store16(float* p, v16 x) { std::memcpy(p, &x, sizeof(x)); }

// exp for x <= 0 (scores minus their running max): 2^n * p(r), |r| <= ln2/2, n rounded
// with the 1.5 * 2^23 trick (std::nearbyint would keep it scalar).
inline v16 exp16(v16 x) {
  x = x < -87.0f ? v16{} - 87.0f : x;
  const v16 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float hsum(v16 x) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}

// Rows r0 .. r0 + R of one head over one page: scores, online softmax, values.
// q, acc: [rows, DC * 16]; k: [DC * 16, 16]; v: [16, DC * 16]; visible[r]: keys of the page row r sees.
template <int R, int DC>
inline void page_tile(const float* q, const float* k, const float* v, const int64_t* visible,
                      float* m, float* l, float* acc) {
  constexpr int D = DC * 16;
  v16 s[R][2] = {};
  for (int d = 0; d < D; d += 2) {
    const v16 k0 = load16(k + d * 16), k1 = load16(k + (d + 1) * 16);
    for (int r = 0; r < R; ++r) {
      s[r][0] += q[r * D + d] * k0;
      s[r][1] += q[r * D + d + 1] * k1;
    }
  }
  const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  alignas(64) float e[R][16];
  float correction[R];
  for (int r = 0; r < R; ++r) {
    const v16 seen = lane < static_cast<float>(visible[r]) ? v16{} + 1.0f : v16{};
    const v16 sr = seen > 0.0f ? s[r][0] + s[r][1] : v16{} - 1e30f;
    const float mx = std::max(m[r], hmax(sr));
    const v16 er = exp16(sr - mx) * seen;
    correction[r] = exp16(v16{} + (m[r] - mx))[0];  // exp(-inf) = 0 at the first page
    l[r] = l[r] * correction[r] + hsum(er);
    m[r] = mx;
    store16(e[r], er);
  }
  v16 a[R][DC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DC; ++c) a[r][c] = load16(acc + r * D + c * 16) * correction[r];
  // Only keys some row sees: the rest of a page may hold stale values (even NaN) that a
  // zero weight would not cancel.
  int64_t keys = 0;
  for (int r = 0; r < R; ++r) keys = std::max(keys, visible[r]);
  for (int t = 0; t < keys; ++t)
    for (int c = 0; c < DC; ++c) {
      const v16 vt = load16(v + t * D + c * 16);
      for (int r = 0; r < R; ++r) a[r][c] += e[r][t] * vt;
    }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DC; ++c) store16(acc + r * D + c * 16, a[r][c]);
}

template <int DC>
void attend_item(const Problem& p, const Item& it, Scratch& sc) {
  constexpr int64_t D = DC * 16, bs = 16;
  const int64_t G = p.heads / p.kv_heads, rows = it.count * G;  // row r: query r / G, member r % G
  sc.reserve(rows, D, bs);
  float* q = sc.q.data();
  float* acc = sc.acc.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  int64_t* visible = sc.visible.data();
  const int32_t q_start = p.query_start_loc[it.seq];
  const int32_t q_len = p.query_start_loc[it.seq + 1] - q_start;
  const int32_t first_pos = p.context_lens[it.seq] - q_len + it.first;
  const int64_t pages = (first_pos + it.count - 1) / bs + 1;
  const int32_t* table = p.block_tables + it.seq * p.max_pages;
  const int64_t page_elems = D * bs, page_bytes = page_elems * p.elem_size;
  for (int64_t h = it.head0; h < it.head1; ++h) {
    auto row_ptr = [&](const float* base, int64_t r) {
      return base + ((q_start + it.first + r / G) * p.heads + h * G + r % G) * D;
    };
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = row_ptr(p.q, r);
      for (int64_t d = 0; d < D; ++d) q[r * D + d] = src[d] * p.scale;
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] = 0.0f;
      m[r] = -INFINITY;
      l[r] = 0.0f;
    }
    auto page_offset = [&](int64_t page) {
      return ((p.layer * p.num_blocks + table[page]) * p.kv_heads + h) * page_bytes;
    };
    for (int64_t page = 0; page < pages; ++page) {
      const int64_t offset = page_offset(page);
      if (page + 1 < pages) {  // the next page, while this one computes
        prefetch(p.k_pool + page_offset(page + 1), page_bytes);
        prefetch(p.v_pool + page_offset(page + 1), page_bytes);
      }
      const float* k;
      const float* v;
      if (p.elem_size == 2) {
        const uint16_t* k16 = reinterpret_cast<const uint16_t*>(p.k_pool + offset);
        const uint16_t* v16p = reinterpret_cast<const uint16_t*>(p.v_pool + offset);
        for (int64_t i = 0; i < page_elems; ++i) sc.k_f32[i] = bf16_to_f32(k16[i]);
        for (int64_t i = 0; i < page_elems; ++i) sc.v_f32[i] = bf16_to_f32(v16p[i]);
        k = sc.k_f32.data();
        v = sc.v_f32.data();
      } else {
        k = reinterpret_cast<const float*>(p.k_pool + offset);
        v = reinterpret_cast<const float*>(p.v_pool + offset);
      }
      // Rows are in query order: the first ones may come before this page and see none of it.
      int64_t r = rows;
      for (int64_t i = rows - 1; i >= 0; --i) {
        visible[i] = std::min<int64_t>(bs, first_pos + i / G - page * bs + 1);
        if (visible[i] > 0) r = i;
      }
      for (; r + 4 <= rows; r += 4)
        page_tile<4, DC>(q + r * D, k, v, &visible[r], m + r, l + r, acc + r * D);
      switch (rows - r) {
        case 3: page_tile<3, DC>(q + r * D, k, v, &visible[r], m + r, l + r, acc + r * D); break;
        case 2: page_tile<2, DC>(q + r * D, k, v, &visible[r], m + r, l + r, acc + r * D); break;
        case 1: page_tile<1, DC>(q + r * D, k, v, &visible[r], m + r, l + r, acc + r * D); break;
        default: break;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = const_cast<float*>(row_ptr(p.out, r));
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
    }
  }
}

// Shared by the caller and the pool tasks; a task that starts after the work is done finds
// the counter exhausted and only drops its reference.
struct Work {
  Problem problem;
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void run() {
    const int64_t total = static_cast<int64_t>(items.size());
    std::unique_ptr<Scratch> scratch;
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      if (!scratch) scratch = std::make_unique<Scratch>();
      switch (problem.head_dim) {
        case 32: attend_item<2>(problem, items[i], *scratch); break;
        case 64: attend_item<4>(problem, items[i], *scratch); break;
        case 96: attend_item<6>(problem, items[i], *scratch); break;
        case 128: attend_item<8>(problem, items[i], *scratch); break;
        default: attend_item<16>(problem, items[i], *scratch); break;  // 256, checked
      }
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

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
  if (p.block_size != 16 || (p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 96 &&
                             p.head_dim != 128 && p.head_dim != 256))
    return ffi::Error::InvalidArgument("paged attention: needs block_size 16 and head_dim 32/64/96/128/256");
  std::memset(p.out, 0, sizeof(float) * qd[0] * qd[1] * qd[2]);  // padding tokens: zeros

  auto work = std::make_shared<Work>();
  work->problem = p;
  const int64_t B = td[0];
  // A sequence's KV heads lie side by side in each block: one item reads them together,
  // unless there are too few sequences to keep every thread busy.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
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
        work->items.push_back({b, first, std::min(kTileQueries, q_len - first), h,
                               static_cast<int32_t>(std::min<int64_t>(h + head_step, p.kv_heads))});
  }
  const int64_t total = static_cast<int64_t>(work->items.size());
  if (total == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == total; });
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
