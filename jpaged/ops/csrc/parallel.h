// Work sharing of jpaged's CPU kernels over XLA's intra-op threads (jpaged/ops/build.py puts
// this folder on every kernel's include path).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>

#include "xla/ffi/api/ffi.h"

// Runs items 0 .. total - 1 on the calling thread and up to num_threads() - 1 of XLA's
// intra-op threads: one worker per core XLA uses (one more oversubscribed 2 cores and took a
// decode-sized matmul from 0.34 to 0.48 ms). Workers take items from one atomic counter;
// each makes its own item runner with `make_worker()` (its scratch, say) at its first item.
// Returns when every item is done. A pool task that starts later finds the counter exhausted
// and never calls `make_worker`, so it may capture references to the caller's frame.
template <typename MakeWorker>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, MakeWorker make_worker) {
  if (total <= 0) return;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, total, make_worker] {
    std::optional<decltype(make_worker())> worker;
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) {
      if (!worker) worker.emplace(make_worker());
      (*worker)(i);
      if (state->done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, total - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == total; });
}
