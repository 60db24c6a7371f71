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
//   FerryExpertLaunch, FerryExpertLaunchF16, FerryExpertLaunchI8  a whole expert-group launch over a
//                    layer's activations (graphs.moe.ExpertLaunch): gather each slot row's token, the
//                    group above over the experts the launch names in the expert pool (pool_slots
//                    below), and the router-weighted outputs added to the hidden state (expert_launch).
//                    MindSpore's gather, multiply and scatter-add around the group added 12-26% to a
//                    launch of 2 x 64 rows over 1024 tokens.
//   FerryDeltaNetDecode, FerryAttentionDecode  one decode token through a whole DeltaNet or attention
//                    layer up to the routed experts (graphs.layer's layers at T = 1): see
//                    deltanet_decode and attention_decode below.
//   FerryLastHead    the final norm, vocabulary projection and greedy choice of one row (last_head).
//   FerrySlotWrite   expert blocks copied into their slots of the expert pool in place (graphs.moe.SlotWrite):
//                    MindSpore's ScatterUpdate copied a 6 MB FP16 block at 1.3 GB/s here, element by element.
//   The layer and head kernels take their weight matrices in FP32 or FP16 (an artifact with narrow
//   experts stores its dense matrices in FP16), each matrix as its input's dtype says.
//
// Narrow weights are widened to FP32 in registers, 8 at a time, so they are read from memory at their
// stored width. Arithmetic is FP32 with FMA; each output element is one dot product summed in a fixed
// order, so results do not depend on the thread count, on which slot holds an expert, or on the other
// rows of the launch. Threads: the calling thread plus FERRY_CPU_THREADS - 1 persistent workers
// (default: all cores).
//
// Why whole-layer decode kernels: a decode token reads each layer's 120-140 MB of FP32 weights once.
// Inside MindSpore's layer graph the MatMuls read them at 12-15 GB/s and every small operator around
// them costs a launch of its own; here each weight row streams once through one dot product, the rows
// of a stage split over the threads, and the arithmetic between stages is a few loops.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
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
// block); no scale (nullptr) means 1. With prefetch_next, the NR rows after these are fetched into the
// cache while these are read: an expert's weight rows are read as blocks of NR short rows, 4 to 8
// interleaved streams of a few KB that the hardware prefetcher follows poorly, so a decode expert
// launch read INT8 weights at 10-11 GB/s and FP16 at 13-16 GB/s; with the next block fetched ahead,
// 15-17 and 16-18 GB/s (G 8, C 1, experts cycling through 200 MB-800 MB, 2 threads).
template <int NR, int MR, typename W>
inline void dot_block(const float *x, const W *w, int64_t K, const float *scale, float *y, int64_t y_stride,
                      bool prefetch_next) {
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t vector_end = K - K % 8;
  const W *next = w + NR * K;
  constexpr int64_t line = 64 / sizeof(W);  // weights per cache line
  for (int64_t k = 0; k < vector_end; k += 8) {
    if (prefetch_next && k % line == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char *>(next + r * K + k), _MM_HINT_T0);
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

// One row of x (decode) streams the weights and prefetches the next block; with more rows each block is
// reused from the cache, the product is bound by arithmetic, and prefetching slowed a launch of 2 slots
// x 32 rows (INT8 4.7 -> 5.6-5.9 ms).
template <int NR, typename W>
inline void dot_rows(const float *x, int64_t M, const W *w, int64_t K, const float *scale, float *y, int64_t y_stride) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) dot_block<NR, 3>(x + m * K, w, K, scale, y + m * y_stride, y_stride, false);
  if (M - m == 2) dot_block<NR, 2>(x + m * K, w, K, scale, y + m * y_stride, y_stride, false);
  if (M - m == 1) dot_block<NR, 1>(x + m * K, w, K, scale, y + m * y_stride, y_stride, M == 1);
}

// x . w over K for one row of w, summed in four independent chains: with one chain each FMA waits for
// the previous one's result, which caps a core near 2 weights per cycle, below the memory bandwidth
// of FP16 weights on two cores.
template <typename W>
inline float dot(const float *x, const W *w, int64_t K) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(load8(w + k + 8 * u), _mm256_loadu_ps(x + k + 8 * u), acc[u]);
  for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), acc[0]);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < K; ++k) sum += x[k] * widen(w[k]);
  return sum;
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

// G slots' weights: each slot's gate_up [2I, H], down [H, I], and for int8 weights its gate_up_scale [2I]
// and down_scale [H] (each weight row's dot products are multiplied by its scale). Found either as separate
// inputs per slot (FerryExperts*: G gate_up, G down, G gate_up_scale, G down_scale), or in the expert pool
// (FerryExpertLaunch*: see pool_slots).
template <typename W>
struct Slots {
  static constexpr bool scaled = std::is_same_v<W, int8_t>;
  static constexpr int64_t parts = scaled ? 4 : 2;  // arrays per slot
  std::vector<const W *> gate_up, down;
  std::vector<const float *> gate_up_scale, down_scale;

  explicit Slots(int64_t G) : gate_up(G), down(G), gate_up_scale(scaled ? G : 0), down_scale(scaled ? G : 0) {}

  // From separate inputs per slot, part by part.
  static Slots inputs(void **params, int64_t G) {
    Slots slots(G);
    for (int64_t g = 0; g < G; ++g) {
      slots.gate_up[g] = static_cast<const W *>(params[g]);
      slots.down[g] = static_cast<const W *>(params[G + g]);
      if constexpr (scaled) {
        slots.gate_up_scale[g] = static_cast<const float *>(params[2 * G + g]);
        slots.down_scale[g] = static_cast<const float *>(params[3 * G + g]);
      }
    }
    return slots;
  }
};

// out[g, m] = slot g's SwiGLU expert of x[g, m] for m < rows[g] (x, out [G, C, H]); rows past rows[g]
// are neither read nor written.
template <typename W>
void run_experts(const float *x, const std::vector<int64_t> &rows, int64_t C, int64_t H, int64_t I,
                 const Slots<W> &slots, float *out) {
  const int64_t G = static_cast<int64_t>(rows.size());
  thread_local std::vector<float> hidden_buffer;  // the calling thread's: the workers use the pointer
  hidden_buffer.resize(G * C * I);
  float *hidden = hidden_buffer.data();  // [G, C, I]

  // gate and up rows i..i+3 in the same work item, so SwiGLU is applied as soon as both are known
  const int64_t gate_blocks = (I + kBlock - 1) / kBlock;
  WorkerPool::get().run(G * gate_blocks, kChunk, [&](int64_t begin, int64_t end) {
    float gate[kBlock * 64], up[kBlock * 64];  // at most 64 rows of x per pass
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / gate_blocks, i = (item % gate_blocks) * kBlock;
      const int64_t count = I - i < kBlock ? I - i : kBlock;
      const W *w = slots.gate_up[g];
      const float *gate_scale = Slots<W>::scaled ? slots.gate_up_scale[g] + i : nullptr;
      const float *up_scale = Slots<W>::scaled ? slots.gate_up_scale[g] + I + i : nullptr;
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
      const float *scale = Slots<W>::scaled ? slots.down_scale[g] + n : nullptr;
      dot_columns(hidden + g * C * I, rows[g], slots.down[g] + n * I, H - n < kBlock ? H - n : kBlock, I, scale,
                  out + g * C * H + n, H);
    }
  });
}

// Each slot's real rows: counts clamped to [0, C].
std::vector<int64_t> real_rows(const int32_t *counts, int64_t G, int64_t C) {
  std::vector<int64_t> rows(G);
  for (int64_t g = 0; g < G; ++g) rows[g] = counts[g] < 0 ? 0 : (counts[g] > C ? C : counts[g]);
  return rows;
}

// FerryExperts*: inputs x [G, C, H], counts [G] int32, the slots' weights; output [G, C, H], padding
// rows zero.
template <typename W>
int expert_group(int nparam, void **params, int64_t **shapes) {
  const int64_t G = shapes[0][0], C = shapes[0][1], H = shapes[0][2];
  if (nparam != 3 + Slots<W>::parts * G || shapes[2][1] != H) return 1;
  const auto rows = real_rows(static_cast<const int32_t *>(params[1]), G, C);
  auto *out = static_cast<float *>(params[2 + Slots<W>::parts * G]);
  run_experts(static_cast<const float *>(params[0]), rows, C, H, shapes[2][0] / 2, Slots<W>::inputs(params + 2, G), out);
  for (int64_t g = 0; g < G; ++g) std::memset(out + (g * C + rows[g]) * H, 0, sizeof(float) * (C - rows[g]) * H);
  return 0;
}

// The expert pool (offload.device.ExpertPool): S slots of expert blocks, held in one tensor per storage
// dtype of the block, pool k [S, R_k] (FP32, FP16: one tensor; INT8: the int8 weights, then the float32
// scales), row s holding that dtype's region of the block in slot s from its start. Part p of the block
// in slot s starts at element offsets[p] of row s of its tensor. Fills `slots` with the G slots `ids`
// names; false if an id or a part lies outside its pool.
template <typename W>
bool pool_slots(const int32_t *ids, const int32_t *offsets, void **pools, int64_t **pool_shapes, int64_t I,
                int64_t H, Slots<W> &slots) {
  const int64_t G = static_cast<int64_t>(slots.gate_up.size());
  const int64_t sizes[4] = {2 * I * H, H * I, 2 * I, H};  // elements of each part
  for (int p = 0; p < Slots<W>::parts; ++p) {
    const int k = p < 2 ? 0 : 1;  // the pool tensor holding part p
    if (offsets[p] < 0 || offsets[p] + sizes[p] > pool_shapes[k][1]) return false;
  }
  for (int64_t g = 0; g < G; ++g) {
    if (ids[g] < 0 || ids[g] >= pool_shapes[0][0]) return false;
    const W *row = static_cast<const W *>(pools[0]) + ids[g] * pool_shapes[0][1];
    slots.gate_up[g] = row + offsets[0];
    slots.down[g] = row + offsets[1];
    if constexpr (Slots<W>::scaled) {
      if (ids[g] >= pool_shapes[1][0]) return false;
      const float *scales = static_cast<const float *>(pools[1]) + ids[g] * pool_shapes[1][1];
      slots.gate_up_scale[g] = scales + offsets[2];
      slots.down_scale[g] = scales + offsets[3];
    }
  }
  return true;
}

// FerryExpertLaunch*, graphs.moe.ExpertLaunch in one call: inputs hidden [T, H], x [T, H] (the layer's
// MoE input), rows [G, C] int32 (the token of each slot row), scale [G, C] (each row's router weight),
// counts [G] int32, slots [G] int32 (the pool slot of each of the G experts), layout [1 + P] int32 (the
// expert width I, then where each block part starts in its pool row: see pool_slots), then the pool's
// tensors; output hidden plus each real row's scale * expert output added at its
// token [T, H]. The rows are added in slot and row order, so a token's sum has a fixed order; padding
// rows are not computed. A token or slot outside its range fails the launch.
template <typename W>
int expert_launch(int nparam, void **params, int64_t **shapes) {
  constexpr int pools = Slots<W>::scaled ? 2 : 1;
  if (nparam != 8 + pools) return 1;
  const int64_t T = shapes[0][0], H = shapes[0][1], G = shapes[2][0], C = shapes[2][1];
  if (shapes[1][0] != T || shapes[1][1] != H || shapes[3][0] != G || shapes[3][1] != C || shapes[4][0] != G ||
      shapes[5][0] != G || shapes[6][0] != 1 + Slots<W>::parts)
    return 1;
  const auto *hidden = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const auto *tokens = static_cast<const int32_t *>(params[2]);
  const auto *scale = static_cast<const float *>(params[3]);
  const auto rows = real_rows(static_cast<const int32_t *>(params[4]), G, C);
  const auto *layout = static_cast<const int32_t *>(params[6]);
  const int64_t intermediate = layout[0];
  auto *out = static_cast<float *>(params[nparam - 1]);
  Slots<W> slots(G);
  if (intermediate <= 0 ||
      !pool_slots(static_cast<const int32_t *>(params[5]), layout + 1, params + 7, shapes + 7, intermediate, H, slots))
    return 1;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t m = 0; m < rows[g]; ++m)
      if (tokens[g * C + m] < 0 || tokens[g * C + m] >= T) return 1;
  thread_local std::vector<float> gathered_buffer, expert_buffer;  // the calling thread's, reused
  gathered_buffer.resize(G * C * H);
  expert_buffer.resize(G * C * H);
  float *gathered = gathered_buffer.data(), *expert_out = expert_buffer.data();  // [G, C, H] each
  for (int64_t g = 0; g < G; ++g)
    for (int64_t m = 0; m < rows[g]; ++m)
      std::memcpy(gathered + (g * C + m) * H, x + tokens[g * C + m] * H, sizeof(float) * H);
  run_experts(gathered, rows, C, H, intermediate, slots, expert_out);
  constexpr int64_t kCopyRows = 64, kColumns = 256;
  WorkerPool::get().run((T + kCopyRows - 1) / kCopyRows, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kCopyRows, stop = std::min(end * kCopyRows, T);
    std::memcpy(out + first * H, hidden + first * H, sizeof(float) * (stop - first) * H);
  });
  WorkerPool::get().run((H + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kColumns, stop = std::min(end * kColumns, H);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t m = 0; m < rows[g]; ++m) {
        const float weight = scale[g * C + m];
        const float *y = expert_out + (g * C + m) * H;
        float *row = out + tokens[g * C + m] * H;
        for (int64_t j = first; j < stop; ++j) row[j] += weight * y[j];
      }
  });
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

extern "C" int FerryExpertLaunch(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return expert_launch<float>(nparam, params, shapes);
}

extern "C" int FerryExpertLaunchF16(int nparam, void **params, int *, int64_t **shapes, const char **, void *,
                                    void *) {
  return expert_launch<uint16_t>(nparam, params, shapes);
}

extern "C" int FerryExpertLaunchI8(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return expert_launch<int8_t>(nparam, params, shapes);
}

namespace {

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }
inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }  // torch's threshold 20

// A weight matrix input of a layer kernel: FP32, or FP16 (its IEEE half bits).
struct Matrix {
  const void *data;
  bool half;
};

Matrix matrix(void **params, const char **dtypes, int i) {
  return {params[i], std::strcmp(dtypes[i], "float16") == 0};
}

// Whether every input and output has the dtype a kernel takes: int32 at `ints`, FP32 or FP16 at
// `matrices`, FP32 elsewhere.
bool dtypes_match(int nparam, const char **dtypes, std::initializer_list<int> ints,
                  std::initializer_list<int> matrices) {
  for (int i = 0; i < nparam; ++i) {
    const auto is = [&](std::initializer_list<int> list) { return std::find(list.begin(), list.end(), i) != list.end(); };
    const bool ok = is(ints) ? std::strcmp(dtypes[i], "int32") == 0
                             : std::strcmp(dtypes[i], "float32") == 0 ||
                                   (is(matrices) && std::strcmp(dtypes[i], "float16") == 0);
    if (!ok) return false;
  }
  return true;
}

// One matrix-vector product of a stage: out[r] = w[r, :] . x for r < rows.
struct MatVec {
  Matrix w;
  int64_t rows;
  const float *x;
  int64_t K;
  float *out;
};

// Every row of every product, split over the threads in chunks of rows; a row streams once.
void matvecs(std::initializer_list<MatVec> products) {
  std::vector<MatVec> list(products);
  int64_t total = 0;
  for (const auto &p : list) total += p.rows;
  constexpr int64_t kRows = 16;
  WorkerPool::get().run((total + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kRows, stop = first + kRows < total ? first + kRows : total;
      int64_t offset = 0;  // the first row of product p in the stage's row numbering
      for (const auto &p : list) {
        const int64_t from = std::max(first, offset) - offset, to = std::min(stop, offset + p.rows) - offset;
        for (int64_t row = from; row < to; ++row)
          p.out[row] = p.w.half ? dot(p.x, static_cast<const uint16_t *>(p.w.data) + row * p.K, p.K)
                                : dot(p.x, static_cast<const float *>(p.w.data) + row * p.K, p.K);
        offset += p.rows;
      }
    }
  });
}

// x * rsqrt(mean(x^2) + eps) * (1 + weight): Qwen3.5's RMSNorm.
void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
  double squares = 0;
  for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float scale = 1.0f / std::sqrt(static_cast<float>(squares / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * (1.0f + weight[i]);
}

// The layer's second half after its mixer, as graphs.layer.MoEInput computes it for one token:
// partial = h + mixed + the shared expert, x_moe = the post-mixer norm, and the router's top-K.
// `weights` (and their `shapes`, `dtypes`): post_attn_norm [H], router [E, H], shared_gate [Is, H],
// shared_up [Is, H], shared_down [H, Is], shared_expert_gate [1, H]. `mixed` [H] is overwritten.
void moe_input(const float *h, float *mixed, int64_t H, float eps, void **weights, int64_t **shapes,
               const char **dtypes, float *partial, float *x_moe, float *top_weights, int32_t *top_experts, int64_t K) {
  auto w = [&](int i) { return matrix(weights, dtypes, i); };
  const int64_t E = shapes[1][0], Is = shapes[2][0];
  for (int64_t i = 0; i < H; ++i) mixed[i] += h[i];
  rms_norm(mixed, static_cast<const float *>(weights[0]), H, eps, x_moe);
  std::vector<float> logits(E), gate(Is), up(Is), shared(H);
  float shared_logit = 0;
  matvecs({{w(1), E, x_moe, H, logits.data()}, {w(2), Is, x_moe, H, gate.data()}, {w(3), Is, x_moe, H, up.data()},
           {w(5), 1, x_moe, H, &shared_logit}});
  // softmax, top-K (ties to the lower id), renormalised
  const float top = *std::max_element(logits.begin(), logits.end());
  float total = 0;
  for (auto &l : logits) total += (l = std::exp(l - top));
  std::vector<int32_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
  std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t l, int32_t r) {
    return logits[l] != logits[r] ? logits[l] > logits[r] : l < r;
  });
  float chosen = 0;
  for (int64_t i = 0; i < K; ++i) chosen += logits[order[i]] / total;
  for (int64_t i = 0; i < K; ++i) {
    top_experts[i] = order[i];
    top_weights[i] = logits[order[i]] / total / chosen;
  }
  for (int64_t i = 0; i < Is; ++i) gate[i] = silu(gate[i]) * up[i];
  matvecs({{w(4), H, gate.data(), Is, shared.data()}});
  const float shared_scale = sigmoid(shared_logit);
  for (int64_t i = 0; i < H; ++i) partial[i] = mixed[i] + shared_scale * shared[i];
}

// One decode token through a DeltaNet layer, as graphs.layer.DeltaNetLayer computes it at T = 1.
// Inputs: h [1, H], conv_state [W-1, C], rec_state [Hv, Dk, Dv], n_valid [] int32 (0 or 1), eps [1],
// then the layer's weights in DELTANET_WEIGHTS order: input_norm [H], in_proj_qkv [C, H], in_proj_z
// [Hv*Dv, H], in_proj_b [Hv, H], in_proj_a [Hv, H], conv1d [C, W], A_log [Hv], dt_bias [Hv], norm [Dv],
// out_proj [H, Hv*Dv], post_attn_norm [H], router [E, H], shared_gate [Is, H], shared_up [Is, H],
// shared_down [H, Is], shared_expert_gate [1, H]. Outputs: partial [1, H] (residual + mixer + shared
// expert), x_moe [1, H], top-K weights [1, K] and expert ids [1, K] int32, conv_state, rec_state.
int deltanet_decode(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  constexpr int kInputs = 21;
  if (nparam != kInputs + 6 || !dtypes_match(nparam, dtypes, {3, kInputs + 3}, {6, 7, 8, 9, 14, 16, 17, 18, 19, 20}))
    return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const int64_t H = shapes[0][1], W = shapes[1][0] + 1, C = shapes[1][1];
  const int64_t Hv = shapes[2][0], Dk = shapes[2][1], Dv = shapes[2][2];
  const int64_t E = shapes[16][0], K = shapes[kInputs + 2][1];
  const int64_t key_width = (C - Hv * Dv) / 2, Hk = key_width / Dk, rep = Hv / Hk;
  if (key_width <= 0 || Hk * Dk != key_width || rep * Hk != Hv || K > E) return 1;
  const float *h = in(0), *conv_state = in(1), *rec_state = in(2);
  const float real = *static_cast<const int32_t *>(params[3]) > 0 ? 1.0f : 0.0f;  // padding leaves the state
  const float eps = *in(4);
  const float *input_norm = in(5), *conv = in(10), *a_log = in(11), *dt_bias = in(12), *norm = in(13);
  auto w = [&](int i) { return matrix(params, dtypes, i); };
  const Matrix w_qkv = w(6), w_z = w(7), w_b = w(8), w_a = w(9), w_out = w(14);
  auto *partial = static_cast<float *>(params[kInputs]);
  auto *x_moe = static_cast<float *>(params[kInputs + 1]);
  auto *top_weights = static_cast<float *>(params[kInputs + 2]);
  auto *top_experts = static_cast<int32_t *>(params[kInputs + 3]);
  auto *conv_out = static_cast<float *>(params[kInputs + 4]);
  auto *rec_out = static_cast<float *>(params[kInputs + 5]);

  std::vector<float> x(H), qkv(C), z(Hv * Dv), b(Hv), a(Hv), core(Hv * Dv), mixed(H);
  rms_norm(h, input_norm, H, eps, x.data());
  matvecs({{w_qkv, C, x.data(), H, qkv.data()}, {w_z, Hv * Dv, x.data(), H, z.data()},
           {w_b, Hv, x.data(), H, b.data()}, {w_a, Hv, x.data(), H, a.data()}});

  // causal depthwise conv over [state; qkv], SiLU; the state shifts by one row
  for (int64_t c = 0; c < C; ++c) {
    float sum = 0;
    for (int64_t j = 0; j < W - 1; ++j) sum += conv_state[j * C + c] * conv[c * W + j];
    sum += qkv[c] * conv[c * W + W - 1];
    for (int64_t j = 0; j + 1 < W - 1; ++j) conv_out[j * C + c] = conv_state[(j + 1) * C + c];
    conv_out[(W - 2) * C + c] = qkv[c];
    qkv[c] = silu(sum);
  }
  // the recurrent step per value head, then the gated norm of its output
  WorkerPool::get().run(Hv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(Dk), k(Dk), remembered(Dv);
    for (int64_t head = begin; head < end; ++head) {
      const float *q_raw = qkv.data() + (head / rep) * Dk, *k_raw = q_raw + key_width;
      const float *v = qkv.data() + 2 * key_width + head * Dv;
      float qq = 0, kk = 0;
      for (int64_t d = 0; d < Dk; ++d) qq += q_raw[d] * q_raw[d], kk += k_raw[d] * k_raw[d];
      const float q_scale = 1.0f / std::sqrt(qq + 1e-6f) / std::sqrt(static_cast<float>(Dk));
      const float k_scale = 1.0f / std::sqrt(kk + 1e-6f);
      for (int64_t d = 0; d < Dk; ++d) q[d] = q_raw[d] * q_scale, k[d] = k_raw[d] * k_scale;
      const float beta = sigmoid(b[head]) * real;
      const float decay = std::exp(-std::exp(a_log[head]) * softplus(a[head] + dt_bias[head]) * real);
      const float *state = rec_state + head * Dk * Dv;
      float *updated = rec_out + head * Dk * Dv;
      std::fill(remembered.begin(), remembered.end(), 0.0f);
      for (int64_t i = 0; i < Dk; ++i)
        for (int64_t j = 0; j < Dv; ++j) {
          updated[i * Dv + j] = state[i * Dv + j] * decay;
          remembered[j] += k[i] * updated[i * Dv + j];
        }
      float *out = core.data() + head * Dv;
      std::fill(out, out + Dv, 0.0f);
      for (int64_t j = 0; j < Dv; ++j) remembered[j] = (v[j] - remembered[j]) * beta;  // the delta
      for (int64_t i = 0; i < Dk; ++i)
        for (int64_t j = 0; j < Dv; ++j) {
          updated[i * Dv + j] += k[i] * remembered[j];
          out[j] += q[i] * updated[i * Dv + j];
        }
      double squares = 0;
      for (int64_t j = 0; j < Dv; ++j) squares += static_cast<double>(out[j]) * out[j];
      const float scale = 1.0f / std::sqrt(static_cast<float>(squares / Dv) + eps);
      for (int64_t j = 0; j < Dv; ++j) out[j] = out[j] * scale * norm[j] * silu(z[head * Dv + j]);
    }
  });
  matvecs({{w_out, H, core.data(), Hv * Dv, mixed.data()}});

  moe_input(h, mixed.data(), H, eps, params + 15, shapes + 15, dtypes + 15, partial, x_moe, top_weights, top_experts,
            K);
  return 0;
}

// One decode token through a full-attention layer, as graphs.layer.AttentionLayer computes it at T = 1.
// Inputs: h [1, H], cos [1, P], sin [1, P], k_cache [S, KV, D], v_cache [S, KV, D], cache_len [] int32,
// eps [1], then the layer's weights in ATTENTION_WEIGHTS order: input_norm [H], q_proj [N*2D, H] (per head
// D query rows, then D gate rows), k_proj [KV*D, H], v_proj [KV*D, H], o_proj [H, N*D], q_norm [D],
// k_norm [D], then the MoE-input weights (moe_input). Outputs: partial [1, H], x_moe [1, H], top-K weights
// [1, K] and ids [1, K] int32. The token's key and value are written into the caches at row cache_len,
// in place (the caches stay on the device for the whole run; the graph's own operators update them in
// place the same way).
int attention_decode(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  constexpr int kInputs = 20;
  if (nparam != kInputs + 4 || !dtypes_match(nparam, dtypes, {5, kInputs + 3}, {8, 9, 10, 11, 15, 16, 17, 18, 19}))
    return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const int64_t H = shapes[0][1], P = shapes[1][1], S = shapes[3][0], KV = shapes[3][1], D = shapes[3][2];
  const int64_t N = shapes[8][0] / (2 * D), R = N / KV, K = shapes[kInputs + 2][1];
  const int64_t cached = *static_cast<const int32_t *>(params[5]);
  if (N * 2 * D != shapes[8][0] || R * KV != N || P > D || P % 2 || cached < 0 || cached >= S) return 1;
  const float *h = in(0), *cos = in(1), *sin = in(2), *k_cache = in(3), *v_cache = in(4), eps = *in(6);
  const float *q_norm = in(12), *k_norm = in(13);
  auto w = [&](int i) { return matrix(params, dtypes, i); };
  const Matrix w_q = w(8), w_k = w(9), w_v = w(10), w_o = w(11);
  float *key = static_cast<float *>(params[3]) + cached * KV * D;  // the caches' row of this token
  float *value = static_cast<float *>(params[4]) + cached * KV * D;

  std::vector<float> x(H), q_and_gate(N * 2 * D), out(N * D), mixed(H);
  rms_norm(h, in(7), H, eps, x.data());
  std::vector<float> raw_key(KV * D);
  matvecs({{w_q, N * 2 * D, x.data(), H, q_and_gate.data()}, {w_k, KV * D, x.data(), H, raw_key.data()},
           {w_v, KV * D, x.data(), H, value}});
  // q/k norm per head, then RoPE on the first P dims: x * cos + rotate_half(x) * sin
  auto norm_rope = [&](const float *from, const float *weight, float *to) {
    rms_norm(from, weight, D, eps, to);
    std::vector<float> rotated(to, to + P);
    for (int64_t i = 0; i < P; ++i) {
      const float half = i < P / 2 ? -rotated[i + P / 2] : rotated[i - P / 2];
      to[i] = rotated[i] * cos[i] + half * sin[i];
    }
  };
  for (int64_t g = 0; g < KV; ++g) norm_rope(raw_key.data() + g * D, k_norm, key + g * D);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  WorkerPool::get().run(N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D), scores(cached + 1);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t g = head / R;  // its key/value head
      norm_rope(q_and_gate.data() + head * 2 * D, q_norm, q.data());
      for (int64_t s = 0; s < cached; ++s)
        scores[s] = dot(q.data(), k_cache + (s * KV + g) * D, D);
      scores[cached] = dot(q.data(), key + g * D, D);
      float top = -INFINITY, total = 0;
      for (auto &v : scores) top = std::max(top, v *= scale);
      for (auto &v : scores) total += (v = std::exp(v - top));
      float *o = out.data() + head * D;
      std::fill(o, o + D, 0.0f);
      for (int64_t s = 0; s <= cached; ++s) {
        const float weight = scores[s] / total;
        const float *v = s < cached ? v_cache + (s * KV + g) * D : value + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] += weight * v[d];
      }
      const float *gate = q_and_gate.data() + head * 2 * D + D;
      for (int64_t d = 0; d < D; ++d) o[d] *= sigmoid(gate[d]);
    }
  });
  matvecs({{w_o, H, out.data(), N * D, mixed.data()}});
  moe_input(h, mixed.data(), H, eps, params + 14, shapes + 14, dtypes + 14, static_cast<float *>(params[kInputs]),
            static_cast<float *>(params[kInputs + 1]), static_cast<float *>(params[kInputs + 2]),
            static_cast<int32_t *>(params[kInputs + 3]), K);
  return 0;
}

// The head over one row of a launch, as graphs.embed_head.LastHead computes it: inputs h [T, H], row [1]
// int32, eps [1], final_norm [H], lm_head [V, H]; outputs the row's logits [1, V] and greedy choice [1]
// int32 (the first of equal maxima). The vocabulary projection is a decode token's largest single read.
int last_head(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (nparam != 7 || !dtypes_match(nparam, dtypes, {1, 6}, {4})) return 1;
  const int64_t T = shapes[0][0], H = shapes[0][1], V = shapes[4][0];
  const int64_t row = *static_cast<const int32_t *>(params[1]);
  if (row < 0 || row >= T || shapes[4][1] != H) return 1;
  std::vector<float> x(H);
  rms_norm(static_cast<const float *>(params[0]) + row * H, static_cast<const float *>(params[3]), H,
           *static_cast<const float *>(params[2]), x.data());
  auto *logits = static_cast<float *>(params[5]);
  matvecs({{matrix(params, dtypes, 4), V, x.data(), H, logits}});
  *static_cast<int32_t *>(params[6]) = static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  return 0;
}

}  // namespace

extern "C" int FerryDeltaNetDecode(int nparam, void **params, int *, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  return deltanet_decode(nparam, params, shapes, dtypes);
}

extern "C" int FerryAttentionDecode(int nparam, void **params, int *, int64_t **shapes, const char **dtypes,
                                    void *, void *) {
  return attention_decode(nparam, params, shapes, dtypes);
}

extern "C" int FerryLastHead(int nparam, void **params, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  return last_head(nparam, params, shapes, dtypes);
}

// FerrySlotWrite (graphs.moe.SlotWrite): expert blocks copied into their slots of the expert pool, in place.
// Inputs: slots [B] int32, the pool's K tensors [S, R_k], then the blocks' K tensors [B, R_k] (each block
// split by storage dtype as the pool is); output slots again [B]. Row b of each block tensor is copied
// over row slots[b] of its pool tensor, the rows split over the threads. An out-of-range slot or a
// mismatched shape fails the launch before anything is written.
extern "C" int FerrySlotWrite(int nparam, void **params, int *, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  const int K = (nparam - 2) / 2;
  if (K < 1 || nparam != 2 + 2 * K) return 1;
  const int64_t B = shapes[0][0];
  const auto *slots = static_cast<const int32_t *>(params[0]);
  std::vector<int64_t> row_bytes(K);
  for (int k = 0; k < K; ++k) {
    const int pool = 1 + k, block = 1 + K + k;
    if (std::strcmp(dtypes[pool], dtypes[block]) != 0 || shapes[block][0] != B || shapes[block][1] != shapes[pool][1])
      return 1;
    const char *dtype = dtypes[pool];
    const int64_t size = std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "int32") == 0 ? 4
                         : std::strcmp(dtype, "float16") == 0                                    ? 2
                         : std::strcmp(dtype, "int8") == 0 || std::strcmp(dtype, "uint8") == 0   ? 1
                                                                                                 : 0;
    if (size == 0) return 1;
    row_bytes[k] = shapes[pool][1] * size;
  }
  for (int64_t b = 0; b < B; ++b)
    if (slots[b] < 0 || slots[b] >= shapes[1][0]) return 1;
  constexpr int64_t kPiece = 1 << 20;  // bytes per work item
  for (int k = 0; k < K; ++k) {
    const int64_t pieces = (row_bytes[k] + kPiece - 1) / kPiece;
    auto *pool = static_cast<char *>(params[1 + k]);
    const auto *blocks = static_cast<const char *>(params[1 + K + k]);
    WorkerPool::get().run(B * pieces, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / pieces, first = (item % pieces) * kPiece;
        const int64_t count = std::min(kPiece, row_bytes[k] - first);
        std::memcpy(pool + slots[b] * row_bytes[k] + first, blocks + b * row_bytes[k] + first, count);
      }
    });
  }
  std::memcpy(params[nparam - 1], slots, sizeof(int32_t) * B);
  return 0;
}
