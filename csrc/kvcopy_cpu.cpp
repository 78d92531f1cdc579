// CPU batched gather/scatter: every layer, block and segment of a request in one call, split over
// a small persistent thread pool. Each worker copies runs of consecutive work units and merges
// runs that are contiguous on both sides (adjacent blocks) into one memcpy.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvcopy.h"
#include "kvcopy_check.h"

#if defined(__x86_64__) || defined(__SSE2__)
#include <emmintrin.h>
#define KVCOPY_HAVE_NT 1
#endif

namespace {

// memcpy with non-temporal (streaming) stores: for large batched copies the destination is not
// read again soon, and skipping the read-for-ownership of every destination line is what makes
// glibc's memcpy fast on big buffers. Falls back to memcpy off x86.
void copy_stream(char* dst, const char* src, size_t len) {
#ifdef KVCOPY_HAVE_NT
  size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  if (len < 256 || head > len) {
    std::memcpy(dst, src, len);
    return;
  }
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  len -= head;
  size_t n = len / 64;
  for (size_t i = 0; i < n; ++i, dst += 64, src += 64) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
  std::memcpy(dst, src, len % 64);
#else
  std::memcpy(dst, src, len);
#endif
}

void stream_fence() {
#ifdef KVCOPY_HAVE_NT
  _mm_sfence();
#endif
}

int g_streaming = -1;  // -1: decide from KVCORE_COPY_STREAMING (default on)

bool streaming_enabled() {
  if (g_streaming < 0) {
    const char* env = std::getenv("KVCORE_COPY_STREAMING");
    g_streaming = (env && env[0] == '0') ? 0 : 1;
  }
  return g_streaming == 1;
}

thread_local std::string g_error;

class Pool {
 public:
  explicit Pool(int threads) : pid_(getpid()) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }
  pid_t pid() const { return pid_; }

  // Runs f on every pool thread and the caller; returns when all have returned. Falls back to
  // the caller alone when another call holds the pool.
  void run(const std::function<void()>& f) {
    std::unique_lock<std::mutex> call(call_, std::try_to_lock);
    if (!call.owns_lock() || workers_.empty()) {
      f();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = &f;
      active_ = static_cast<int>(workers_.size());
      ++gen_;
    }
    cv_.notify_all();
    f();
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return active_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void()>* f;
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return gen_ != seen; });
        seen = gen_;
        f = job_;
      }
      (*f)();
      std::lock_guard<std::mutex> lock(m_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  pid_t pid_;
  std::vector<std::thread> workers_;
  std::mutex call_, m_;
  std::condition_variable cv_, done_;
  const std::function<void()>* job_ = nullptr;
  uint64_t gen_ = 0;
  int active_ = 0;
};

std::mutex g_pool_mutex;
Pool* g_pool = nullptr;  // leaked on purpose: no join at interpreter exit
int g_threads = 0;

int default_threads() {
  if (const char* env = std::getenv("KVCORE_COPY_THREADS")) {
    int t = std::atoi(env);
    if (t > 0) return t;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::max(1u, std::min(hw, 4u)));
}

Pool* pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_threads <= 0) g_threads = default_threads();
  // After fork() the workers are gone: start a fresh pool and leak the old one.
  if (!g_pool || g_pool->pid() != getpid() || g_pool->size() != g_threads)
    g_pool = new Pool(g_threads);
  return g_pool;
}

constexpr int64_t kMinParallelBytes = 1 << 20;   // below this, one thread
constexpr int64_t kBatchBytes = 1 << 20;         // work grabbed per atomic step
constexpr int64_t kStreamBytes = 8 << 20;        // streaming stores from this total size on

}  // namespace

extern "C" {

const char* kvcopy_last_error(void) { return g_error.c_str(); }

const char* kvcopy_version(void) { return "kvcopy 1"; }

int kvcopy_cpu_set_threads(int threads) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_threads = threads > 0 ? threads : default_threads();
  return g_threads;
}

int kvcopy_cpu_set_streaming(int on) {
  g_streaming = on ? 1 : 0;
  return g_streaming;
}

int kvcopy_cpu_threads(void) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_threads <= 0) g_threads = default_threads();
  return g_threads;
}

int kvcopy_cpu_copy(int direction, const kvcopy_layout* layout, const uint64_t* layer_ptrs,
                    int64_t num_layers, int64_t layer_extent, const uint64_t* chunk_ptrs,
                    const int64_t* chunk_sizes, const int64_t* block_ids, int64_t n, int64_t k) {
  int rc = kvcopy::check(direction, layout, layer_ptrs, num_layers, layer_extent, chunk_ptrs,
                         chunk_sizes, block_ids, n, k, g_error);
  if (rc != 0 || n == 0) return rc;
  const kvcopy_layout l = *layout;
  const int64_t S = l.segments, seg = l.segment_bytes;
  const int64_t total = num_layers * n * S * seg;
  Pool* p = total >= kMinParallelBytes ? pool() : nullptr;
  const int64_t threads = p ? p->size() : 1;
  // Split segments into parts so that every thread has several units of work.
  int64_t units_wanted = threads * 8;
  int64_t base_units = num_layers * n * S;
  int64_t parts = base_units >= units_wanted ? 1 : (units_wanted + base_units - 1) / base_units;
  int64_t piece = (seg + parts - 1) / parts;
  piece = (piece + 63) & ~int64_t(63);
  parts = (seg + piece - 1) / piece;
  const int64_t units = base_units * parts;
  const int64_t batch = std::max<int64_t>(1, kBatchBytes / std::min(piece, seg));
  std::atomic<int64_t> next{0};
  const bool gather = direction == KVCOPY_GATHER;
  const bool stream = total >= kStreamBytes && streaming_enabled();
  auto flush = [stream](char* d, const char* s, int64_t len) {
    if (stream)
      copy_stream(d, s, static_cast<size_t>(len));
    else
      std::memcpy(d, s, static_cast<size_t>(len));
  };

  auto work = [&] {
    for (;;) {
      int64_t start = next.fetch_add(batch, std::memory_order_relaxed);
      if (start >= units) return;
      int64_t end = std::min(units, start + batch);
      char* pd = nullptr;
      const char* ps = nullptr;
      int64_t plen = 0;
      for (int64_t u = start; u < end; ++u) {
        int64_t part = u % parts, r = u / parts;
        int64_t s = r % S;
        r /= S;
        int64_t i = r % n, layer = r / n;
        int64_t j = i / k, ii = i - j * k;
        int64_t kj = std::min(k, n - j * k);
        int64_t off = part * piece, len = std::min(piece, seg - off);
        char* chunk = reinterpret_cast<char*>(chunk_ptrs[j]) + ((layer * kj + ii) * S + s) * seg + off;
        char* blk = reinterpret_cast<char*>(layer_ptrs[layer]) + block_ids[i] * l.block_stride +
                    s * l.segment_stride + off;
        char* dst = gather ? chunk : blk;
        const char* src = gather ? blk : chunk;
        if (plen && dst == pd + plen && src == ps + plen) {
          plen += len;
          continue;
        }
        if (plen) flush(pd, ps, plen);
        pd = dst;
        ps = src;
        plen = len;
      }
      if (plen) flush(pd, ps, plen);
    }
    if (stream) stream_fence();
  };
  if (p)
    p->run(work);
  else
    work();
  return 0;
}

}  // extern "C"
