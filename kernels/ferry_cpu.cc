// Ferry's CPU kernels, called from MindSpore graphs as AOT custom ops (ops.Custom, func_type="aot"),
// and from the host on numpy arrays (kernels/host.py, through the same entry points).
//
// Why: on the CPU backend, an expert-group launch built from MindSpore's operators runs 2 x G
// MatMuls plus slicing and SwiGLU ops, reads a decode token's expert weights at 10-15 GB/s, and
// computes every padding row of every slot. One kernel call streams the weights at close to the
// memory bandwidth (decode) or runs a register-blocked product over the real rows only (prefill).
//
//   FerryExperts     out [G, C, H] = G SwiGLU experts: inputs x [G, C, H], counts [G] int32 (real rows
//                    per slot), then G gate_up [2I, H] (gate rows, then up rows), then G down [H, I].
//                    Rows at or past counts[g] come out as zeros and cost nothing.
//   FerryExpertsF16  the same with gate_up and down in float16.
//   FerryExpertsI8   the same with gate_up and down in int8, then G gate_up_scale [2I] and G down_scale
//                    [H] float32: each weight row's dot products are multiplied by that row's scale.
//
// Narrow weights are widened to FP32 in registers, 8 at a time, so they are read from memory at their
// stored width. Arithmetic is FP32 with FMA; each output element is one dot product summed in a fixed
// order, so results do not depend on the thread count, on which slot holds an expert, or on the other
// rows of the launch. Threads: the calling thread plus FERRY_CPU_THREADS - 1 persistent workers
// (default: all cores).
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "Ferry's CPU kernels need AVX2, FMA and F16C"
#endif

namespace {

// Runs fn(begin, end) over [0, items) in chunks, on the caller and the workers.
class WorkerPool {
 public:
  static WorkerPool &get() {
    static WorkerPool pool;
    return pool;
  }

  void run(int64_t items, int64_t chunk, const std::function<void(int64_t, int64_t)> &fn) {
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    if (workers_.empty() || items <= chunk) {
      fn(0, items);
      return;
    }
    job_ = &fn;
    items_ = items;
    chunk_ = chunk;
    next_.store(0, std::memory_order_relaxed);
    busy_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    work();
    while (busy_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  WorkerPool() {
    const char *env = std::getenv("FERRY_CPU_THREADS");
    int threads = env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this] { loop(); });
  }

  ~WorkerPool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto &worker : workers_) worker.join();
  }

  void work() {
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= items_) return;
      (*job_)(begin, begin + chunk_ < items_ ? begin + chunk_ : items_);
    }
  }

  void loop() {
    uint64_t seen = 0;  // the generation at construction: a job posted before this thread ran is still new
    for (;;) {
      // spin briefly (the next job of a launch follows within microseconds), then sleep
      for (int spin = 0; spin < 1000 && generation_.load(std::memory_order_acquire) == seen; ++spin) _mm_pause();
      generation_.wait(seen, std::memory_order_acquire);
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load()) return;
      work();
      busy_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mutex_;
  const std::function<void(int64_t, int64_t)> *job_ = nullptr;
  int64_t items_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<int> busy_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// The weight formats, each widened to FP32: 8 at a time into a register, or one at a time.
// FP16 weights are passed as their IEEE half bits (uint16_t).
inline __m256 load8(const float *w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t *w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w)));
}
inline __m256 load8(const int8_t *w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(w))));
}
inline float widen(float w) { return w; }
inline float widen(uint16_t w) { return _cvtsh_ss(w); }
inline float widen(int8_t w) { return static_cast<float>(w); }

// y[m * y_stride + r] = (x[m, :] . w[r, :]) * scale[r] for NR rows of w and MR rows of x (a register
// block); no scale (nullptr) means 1.
template <int NR, int MR, typename W>
inline void dot_block(const float *x, const W *w, int64_t K, const float *scale, float *y, int64_t y_stride) {
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t vector_end = K - K % 8;
  for (int64_t k = 0; k < vector_end; k += 8) {
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load8(w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      float sum = hsum(acc[r][m]);
      for (int64_t k = vector_end; k < K; ++k) sum += x[m * K + k] * widen(w[r * K + k]);
      y[m * y_stride + r] = scale ? sum * scale[r] : sum;
    }
}

template <int NR, typename W>
inline void dot_rows(const float *x, int64_t M, const W *w, int64_t K, const float *scale, float *y, int64_t y_stride) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) dot_block<NR, 3>(x + m * K, w, K, scale, y + m * y_stride, y_stride);
  if (M - m == 2) dot_block<NR, 2>(x + m * K, w, K, scale, y + m * y_stride, y_stride);
  if (M - m == 1) dot_block<NR, 1>(x + m * K, w, K, scale, y + m * y_stride, y_stride);
}

// y[m * y_stride + r] = (x[m, :] . w[r, :]) * scale[r] for m < M and r < count <= 4 (w [count, K]).
template <typename W>
inline void dot_columns(const float *x, int64_t M, const W *w, int64_t count, int64_t K, const float *scale, float *y,
                        int64_t y_stride) {
  switch (count) {
    case 4: dot_rows<4>(x, M, w, K, scale, y, y_stride); break;
    case 3: dot_rows<3>(x, M, w, K, scale, y, y_stride); break;
    case 2: dot_rows<2>(x, M, w, K, scale, y, y_stride); break;
    default: dot_rows<1>(x, M, w, K, scale, y, y_stride); break;
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

constexpr int64_t kBlock = 4;  // weight rows per register block
constexpr int64_t kChunk = 8;  // register blocks per work item handed to a thread

// One expert-group launch with weights of type W; int8 weights come with per-row scales.
template <typename W>
int expert_group(int nparam, void **params, int64_t **shapes) {
  constexpr bool scaled = std::is_same_v<W, int8_t>;
  constexpr int64_t parts = scaled ? 4 : 2;  // inputs per slot
  const int64_t G = shapes[0][0], C = shapes[0][1], H = shapes[0][2];
  if (nparam != 3 + parts * G || shapes[2][1] != H) return 1;
  const int64_t I = shapes[2][0] / 2;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *counts = static_cast<const int32_t *>(params[1]);
  const auto *const *gate_up = reinterpret_cast<const W *const *>(params + 2);
  const auto *const *down = reinterpret_cast<const W *const *>(params + 2 + G);
  const auto *const *gate_up_scale = scaled ? reinterpret_cast<const float *const *>(params + 2 + 2 * G) : nullptr;
  const auto *const *down_scale = scaled ? reinterpret_cast<const float *const *>(params + 2 + 3 * G) : nullptr;
  auto *out = static_cast<float *>(params[2 + parts * G]);
  std::vector<int64_t> rows(G);
  for (int64_t g = 0; g < G; ++g) rows[g] = counts[g] < 0 ? 0 : (counts[g] > C ? C : counts[g]);
  thread_local std::vector<float> hidden_buffer;
  hidden_buffer.resize(G * C * I);
  float *hidden = hidden_buffer.data();  // [G, C, I]

  // gate and up rows i..i+3 in the same work item, so SwiGLU is applied as soon as both are known
  const int64_t gate_blocks = (I + kBlock - 1) / kBlock;
  WorkerPool::get().run(G * gate_blocks, kChunk, [&](int64_t begin, int64_t end) {
    float gate[kBlock * 64], up[kBlock * 64];  // at most 64 rows of x per pass
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / gate_blocks, i = (item % gate_blocks) * kBlock;
      const int64_t count = I - i < kBlock ? I - i : kBlock;
      const W *w = gate_up[g];
      const float *gate_scale = scaled ? gate_up_scale[g] + i : nullptr;
      const float *up_scale = scaled ? gate_up_scale[g] + I + i : nullptr;
      for (int64_t m0 = 0; m0 < rows[g]; m0 += 64) {
        const int64_t m_count = rows[g] - m0 < 64 ? rows[g] - m0 : 64;
        const float *xg = x + (g * C + m0) * H;
        dot_columns(xg, m_count, w + i * H, count, H, gate_scale, gate, kBlock);
        dot_columns(xg, m_count, w + (I + i) * H, count, H, up_scale, up, kBlock);
        for (int64_t m = 0; m < m_count; ++m)
          for (int64_t j = 0; j < count; ++j)
            hidden[(g * C + m0 + m) * I + i + j] = silu(gate[m * kBlock + j]) * up[m * kBlock + j];
      }
    }
  });
  const int64_t down_blocks = (H + kBlock - 1) / kBlock;
  WorkerPool::get().run(G * down_blocks, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / down_blocks, n = (item % down_blocks) * kBlock;
      const float *scale = scaled ? down_scale[g] + n : nullptr;
      dot_columns(hidden + g * C * I, rows[g], down[g] + n * I, H - n < kBlock ? H - n : kBlock, I, scale,
                  out + g * C * H + n, H);
    }
  });
  for (int64_t g = 0; g < G; ++g) std::memset(out + (g * C + rows[g]) * H, 0, sizeof(float) * (C - rows[g]) * H);
  return 0;
}

}  // namespace

extern "C" int FerryExperts(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return expert_group<float>(nparam, params, shapes);
}

extern "C" int FerryExpertsF16(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return expert_group<uint16_t>(nparam, params, shapes);
}

extern "C" int FerryExpertsI8(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return expert_group<int8_t>(nparam, params, shapes);
}
