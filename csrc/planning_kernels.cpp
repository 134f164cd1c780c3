// CPU kernels of the planning ops; the specification is each op's PyTorch reference in kernels/.
//
// sample_actions draws the reference's Philox-4x32-10 stream bit for bit: the counters, the rounds and
// the uniforms are integer / exactly rounded float arithmetic done here in plain loops, while log, sqrt,
// cos and sin go through the same ATen kernels the reference calls, elementwise, so they round the same
// way (ATen may hand them to MKL's vector math, whose sqrt is not always the correctly
// rounded one std::sqrt gives). This file is built with -ffp-contract=off: a fused
// multiply-add would round mean + std * z once where the reference rounds twice.
#include "checks.h"
#include "planning.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/sqrt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jepa_engine {
namespace {

constexpr uint32_t kPhiloxKey0 = 0x9E3779B9u, kPhiloxKey1 = 0xBB67AE85u;
constexpr uint32_t kPhiloxRound0 = 0xD2511F53u, kPhiloxRound1 = 0xCD9E8D57u;

constexpr int kLanes = 32;  // Philox blocks per call: a fixed trip count the compiler vectorizes
constexpr uint64_t kBlockMask = (uint64_t{1} << 62) - 1;   // the block of value j is j >> 2, mod 2^62

// The planes a run of blocks [q0, q0 + nb) fills: block k's uniforms u0 -> u[k], u2 -> u[nb + k] (for
// the radii) and w1 -> w[k], w3 -> w[nb + k] (the angles, premultiplied by 2 pi in float, as the
// reference's `2 * math.pi * u` is), each ((x >> 8) + 0.5) / 2^24 in float like the reference.
struct Planes {
  float* u;
  float* w;
  int64_t nb;
};

inline float uniform(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 8)) + 0.5f) / 16777216.0f;
}

// Philox-4x32-10 of kLanes blocks first + [0, kLanes) into the planes at k. The portable path;
// philox_block_avx2 below is the same by hand.
void philox_block(uint64_t seed, uint64_t first, const Planes& o, int64_t k) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t counter = (first + static_cast<uint64_t>(j)) & kBlockMask;
    c0[j] = static_cast<uint32_t>(counter);
    c1[j] = static_cast<uint32_t>(counter >> 32);
    c2[j] = 0;
    c3[j] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int j = 0; j < kLanes; ++j) {
      const uint64_t pb = static_cast<uint64_t>(kPhiloxRound1) * c2[j];
      const uint64_t pa = static_cast<uint64_t>(kPhiloxRound0) * c0[j];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(pb);
      c3[j] = static_cast<uint32_t>(pa);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kPhiloxKey0;
    k1 += kPhiloxKey1;
  }
  const float two_pi = static_cast<float>(6.283185307179586);
  for (int j = 0; j < kLanes; ++j) {
    o.u[k + j] = uniform(c0[j]);
    o.w[k + j] = two_pi * uniform(c1[j]);
    o.u[o.nb + k + j] = uniform(c2[j]);
    o.w[o.nb + k + j] = two_pi * uniform(c3[j]);
  }
}

#if defined(__x86_64__)
// philox_block with AVX2 intrinsics: 32 blocks in eight vectors of four 64-bit lanes, of which only the
// low 32 bits matter (vpmuludq reads only those, and >> 32 of its product is exact), so a round is two
// multiplies, two shifts and four XORs per four blocks; the eight vectors are independent chains, which
// hides the multiplies' latency. (GCC does not vectorize philox_block's 32 x 32 -> 64-bit products by
// itself, so its AVX2 clone runs about scalar.) A CPU with AVX-512 runs this path too.
// [a0 a1 a2 a3 b0 b1 b2 b3] >> 8: the low 32-bit words of two vectors of 64-bit lanes, in order
__attribute__((target("avx2"))) inline __m256i avx2_low_words_shr8(__m256i a, __m256i b, __m256i even) {
  const __m256i lo_a = _mm256_permutevar8x32_epi32(a, even), lo_b = _mm256_permutevar8x32_epi32(b, even);
  return _mm256_srli_epi32(_mm256_permute2x128_si256(lo_a, lo_b, 0x20), 8);
}

__attribute__((target("avx2"))) inline __m256 to_uniform(__m256i x) {
  return _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(0.5f)), _mm256_set1_ps(1.0f / 16777216.0f));
}

__attribute__((target("avx2")))
void philox_block_avx2(uint64_t seed, uint64_t first, const Planes& o, int64_t k) {
  constexpr int V = kLanes / 4;
  const __m256i ra = _mm256_set1_epi64x(kPhiloxRound0), rb = _mm256_set1_epi64x(kPhiloxRound1);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0), mask = _mm256_set1_epi64x(static_cast<int64_t>(kBlockMask));
  __m256i c0[V], c1[V], c2[V], c3[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm256_and_si256(_mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(first + 4 * v)), lane), mask);
    c1[v] = _mm256_srli_epi64(c0[v], 32);
    c2[v] = _mm256_setzero_si256();
    c3[v] = c2[v];
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], rb), pa = _mm256_mul_epu32(c0[v], ra);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[v]), key1);
      c1[v] = pb;
      c3[v] = pa;
    }
    k0 += kPhiloxKey0;
    k1 += kPhiloxKey1;
  }
  // the low 32 bits of each 64-bit lane, two vectors at a time into eight 32-bit lanes (in order), then
  // ((x >> 8) + 0.5) / 2^24 as the reference
  const __m256i even = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
  const __m256 two_pi = _mm256_set1_ps(static_cast<float>(6.283185307179586));
#pragma GCC unroll 4
  for (int v = 0; v < V; v += 2) {
    float* u0 = o.u + k + 4 * v;
    float* w1 = o.w + k + 4 * v;
    _mm256_storeu_ps(u0, to_uniform(avx2_low_words_shr8(c0[v], c0[v + 1], even)));
    _mm256_storeu_ps(w1, _mm256_mul_ps(two_pi, to_uniform(avx2_low_words_shr8(c1[v], c1[v + 1], even))));
    _mm256_storeu_ps(u0 + o.nb, to_uniform(avx2_low_words_shr8(c2[v], c2[v + 1], even)));
    _mm256_storeu_ps(w1 + o.nb, _mm256_mul_ps(two_pi, to_uniform(avx2_low_words_shr8(c3[v], c3[v + 1], even))));
  }
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2");
#endif

// portable: the plain loop whatever the CPU has (JEPA_ENGINE_PORTABLE_KERNELS set), which is how the
// tests check it on machines that would take the vector path
void philox_block_best(uint64_t seed, uint64_t first, const Planes& o, int64_t k, bool portable) {
  (void)portable;   // no vector path off x86-64
#if defined(__x86_64__)
  if (!portable && kHaveAvx2) return philox_block_avx2(seed, first, o, k);
#endif
  philox_block(seed, first, o, k);
}

// the planes of blocks [q0, q0 + o.nb): whole calls of kLanes blocks, the tail through scratch planes
void philox_planes(uint64_t seed, uint64_t q0, const Planes& o, bool portable) {
  float tu[2 * kLanes], tw[2 * kLanes];
  for (int64_t k = 0; k < o.nb; k += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, o.nb - k);
    if (m == kLanes) {
      philox_block_best(seed, q0 + static_cast<uint64_t>(k), o, k, portable);
    } else {
      philox_block_best(seed, q0 + static_cast<uint64_t>(k), Planes{tu, tw, kLanes}, 0, portable);
      std::copy(tu, tu + m, o.u + k);
      std::copy(tw, tw + m, o.w + k);
      std::copy(tu + kLanes, tu + kLanes + m, o.u + o.nb + k);
      std::copy(tw + kLanes, tw + kLanes + m, o.w + o.nb + k);
    }
  }
}

// torch.maximum / torch.minimum: NaN in either argument gives NaN.
inline float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? a + b : (a < b ? b : a); }
inline float nan_min(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? a + b : (b < a ? b : a); }

constexpr int64_t kGrain = 1 << 15;  // elements per thread below which a loop stays on one thread
// sampled values per thread below which a draw stays on one thread: Philox and the transcendentals cost
// about 4 ns a value on one AVX2 core, so a chunk of 4096 pays for waking a second thread
constexpr int64_t kDrawGrain = 1 << 12;

// MKL's vector math (under ATen's float log / sqrt / cos / sin) starts its own OpenMP teams, which
// ParallelGuard does not stop, and waking the pool costs more than a small draw. Where libtorch carries
// MKL, its thread-local limit keeps such a call on the calling thread; the limit is restored on exit.
// (Elementwise: the values are the same on any number of threads.) Weak: a libtorch without MKL
// leaves it null, and there is nothing to limit. (mkl_set_num_threads_local in mkl_service.h is a macro
// for this C entry point; the lower-case symbol is the Fortran one, which takes a pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

class MklLocalThreads {
 public:
  explicit MklLocalThreads(int n) : active_(MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(n);
  }
  ~MklLocalThreads() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);   // 0 restores the global setting
  }
  MklLocalThreads(const MklLocalThreads&) = delete;
  MklLocalThreads& operator=(const MklLocalThreads&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

}  // namespace

at::Tensor sample_actions_cpu(const at::Tensor& mean, const at::Tensor& std, const at::Tensor& low,
                              const at::Tensor& high, const at::Tensor& rng, int64_t n, bool include_mean) {
  const char* op = "sample_actions";
  check_tensor(op, "mean", mean, 2, {at::kFloat}, c10::nullopt);
  const c10::Device dev = mean.device();
  check_tensor(op, "std", std, 2, {at::kFloat}, dev);
  check_shape(op, "std", std, mean.sizes(), "mean.shape");
  check_tensor(op, "low", low, 1, {at::kFloat}, dev);
  check_tensor(op, "high", high, 1, {at::kFloat}, dev);
  check_shape(op, "high", high, low.sizes(), "low.shape");
  const int64_t E = mean.size(0), P = mean.size(1), A = low.numel();
  TORCH_CHECK_VALUE(P % A == 0, op, ": the action dim A = len(low) = ", A, " must divide P = ", P);
  check_tensor(op, "rng", rng, 1, {at::kLong}, dev);
  check_shape(op, "rng", rng, {2}, "[seed, offset]");
  TORCH_CHECK_VALUE(n >= 1, op, ": n must be an int >= 1, got ", n);

  const at::Tensor m = mean.contiguous(), s = std.contiguous(), lo = low.contiguous(), hi = high.contiguous();
  const int64_t* r = rng.contiguous().const_data_ptr<int64_t>();
  const uint64_t seed = static_cast<uint64_t>(r[0]), offset = static_cast<uint64_t>(r[1]);
  const int64_t total = E * n * P;
  auto opts = mean.options();
  at::Tensor out = at::empty({E, n, P}, opts);
  float* po = out.mutable_data_ptr<float>();
  const float* pm = m.const_data_ptr<float>();
  const float* ps = s.const_data_ptr<float>();
  // the bounds of every parameter p (low[p % A], high[p % A]); NaN bounds take the NaN-propagating path
  std::vector<float> lop(P), hip(P);
  bool nan_bounds = false;
  for (int64_t p = 0; p < P; ++p) {
    lop[p] = lo.const_data_ptr<float>()[p % A];
    hip[p] = hi.const_data_ptr<float>()[p % A];
    nan_bounds |= std::isnan(lop[p]) || std::isnan(hip[p]);
  }
  // One pass per chunk of candidate rows, each on one thread while its values are in cache: the
  // uniforms of the Philox blocks under the chunk's values, then the reference's
  // torch.sqrt(-2.0 * torch.log(u)), torch.cos(w) and torch.sin(w) by the same ATen kernels on the
  // chunk's planes (elementwise: each value comes out the same whatever the chunking, as it does for
  // the reference's own split between threads; the product by -2 is exact), the four values of each
  // block, and mean + std * z clamped to the bounds. A draw of one chunk runs on the calling thread.
  const bool portable = std::getenv("JEPA_ENGINE_PORTABLE_KERNELS") != nullptr;
  at::parallel_for(0, E * n, std::max<int64_t>(1, kDrawGrain / P), [&](int64_t row_begin, int64_t row_end) {
    const MklLocalThreads mkl_one_thread(1);
    const int64_t len = (row_end - row_begin) * P;
    const uint64_t j0 = offset + static_cast<uint64_t>(row_begin * P);   // the chunk's first value (wraps)
    const int64_t lead = static_cast<int64_t>(j0 & 3), nb = (lead + len + 3) / 4;
    at::Tensor radius = at::empty({2 * nb}, opts), angle = at::empty({2 * nb}, opts);
    float* pr = radius.mutable_data_ptr<float>();
    philox_planes(seed, j0 >> 2, Planes{pr, angle.mutable_data_ptr<float>(), nb}, portable);
    at::log_(radius);
    for (int64_t i = 0; i < 2 * nb; ++i) pr[i] = -2.0f * pr[i];
    at::sqrt_(radius);
    const at::Tensor cos = at::cos(angle);
    const float* pc = cos.const_data_ptr<float>();
    const float* psin = at::sin_(angle).const_data_ptr<float>();
    std::vector<float> z(4 * nb);   // block-major: r0 cos w1, r0 sin w1, r2 cos w3, r2 sin w3
    for (int64_t q = 0; q < nb; ++q) {
      z[4 * q] = pr[q] * pc[q];
      z[4 * q + 1] = pr[q] * psin[q];
      z[4 * q + 2] = pr[nb + q] * pc[nb + q];
      z[4 * q + 3] = pr[nb + q] * psin[nb + q];
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t env = row / n, cand = row - env * n;
      const float* me = pm + env * P;
      const float* se = ps + env * P;
      float* o = po + row * P;
      const float* zr = z.data() + lead + (row - row_begin) * P;
      if (include_mean && cand == 0) {
        for (int64_t p = 0; p < P; ++p) o[p] = nan_min(nan_max(me[p], lop[p]), hip[p]);
      } else if (nan_bounds) {
        for (int64_t p = 0; p < P; ++p) o[p] = nan_min(nan_max(me[p] + se[p] * zr[p], lop[p]), hip[p]);
      } else {   // x NaN stays NaN, as torch.maximum / torch.minimum keep it
        for (int64_t p = 0; p < P; ++p) {
          const float x = me[p] + se[p] * zr[p];
          const float y = x < lop[p] ? lop[p] : x;
          o[p] = y > hip[p] ? hip[p] : y;
        }
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> elite_refit_cpu(
    const at::Tensor& costs, const at::Tensor& samples, const at::Tensor& mean, const at::Tensor& std,
    c10::string_view mode, int64_t k, double temperature, double momentum, double min_std) {
  const char* op = "elite_refit";
  check_tensor(op, "samples", samples, 3, {at::kFloat, at::kHalf, at::kBFloat16}, c10::nullopt);
  const int64_t E = samples.size(0), N = samples.size(1), P = samples.size(2);
  const c10::Device dev = samples.device();
  check_tensor(op, "costs", costs, 2, {at::kFloat}, dev);
  check_shape(op, "costs", costs, {E, N}, "[E, N]");
  check_tensor(op, "mean", mean, 2, {at::kFloat}, dev);
  check_shape(op, "mean", mean, {E, P}, "[E, P]");
  check_tensor(op, "std", std, 2, {at::kFloat}, dev);
  check_shape(op, "std", std, {E, P}, "[E, P]");
  const bool mppi = mode == "mppi";
  TORCH_CHECK_VALUE(mppi || mode == "cem", op, ": mode must be one of ('cem', 'mppi'), got '", mode, "'");
  TORCH_CHECK_VALUE(mppi || (1 <= k && k <= N), op, ": k must be in [1, N] = [1, ", N, "], got ", k);
  TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", py_float(temperature));
  TORCH_CHECK_VALUE(0.0 <= momentum && momentum <= 1.0, op, ": momentum must be in [0, 1], got ",
                    py_float(momentum));

  const at::Tensor c = costs.contiguous(), x = samples.contiguous(), m = mean.contiguous(), s = std.contiguous();
  auto f32 = mean.options();
  at::Tensor new_mean = at::empty({E, P}, f32), new_std = at::empty({E, P}, f32);
  at::Tensor best_cost = at::empty({E}, f32), best_index = at::empty({E}, f32.dtype(at::kLong));
  const float mom = static_cast<float>(momentum), rest = static_cast<float>(1.0 - momentum);
  const float floor_std = static_cast<float>(min_std), temp = static_cast<float>(temperature);
  const float inv_k = static_cast<float>(1.0 / static_cast<double>(k));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elite_refit_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // environments in parallel only when each thread gets kGrain values or more
    at::parallel_for(0, E, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N * P)), [&](int64_t b, int64_t e_end) {
      std::vector<float> cc(N), w(N);
      std::vector<int64_t> order(mppi ? 0 : N);
      std::vector<double> s1(P), s2(P);
      for (int64_t e = b; e < e_end; ++e) {
        const float* ce = c.const_data_ptr<float>() + e * N;
        // the lowest cost (NaN counts as +inf) and its first index
        float best = std::numeric_limits<float>::infinity();
        int64_t best_i = 0;
        for (int64_t i = 0; i < N; ++i) {
          cc[i] = std::isnan(ce[i]) ? std::numeric_limits<float>::infinity() : ce[i];
          if (cc[i] < best) best = cc[i], best_i = i;
        }
        best_cost.mutable_data_ptr<float>()[e] = best;
        best_index.mutable_data_ptr<int64_t>()[e] = best_i;
        if (mppi) {  // softmax((best - cost) / temperature)
          double z = 0.0;
          for (int64_t i = 0; i < N; ++i) z += (w[i] = std::exp((best - cc[i]) / temp));
          for (int64_t i = 0; i < N; ++i) w[i] = static_cast<float>(w[i] / z);
        } else {     // the k lowest costs, ties to the lower index (a stable sort): a strict total order,
                     // so nth_element selects the same k as the sort, put back in index order
          std::iota(order.begin(), order.end(), int64_t{0});
          std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int64_t a, int64_t bb) {
            return cc[a] < cc[bb] || (cc[a] == cc[bb] && a < bb);
          });
          std::sort(order.begin(), order.begin() + k);
        }
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        const scalar_t* xe = px + e * N * P;
        const auto accumulate = [&](int64_t i, double wi) {
          const scalar_t* xi = xe + i * P;
          for (int64_t p = 0; p < P; ++p) {
            const double v = static_cast<float>(xi[p]);
            s1[p] += wi * v;
            s2[p] += wi * v * v;
          }
        };
        // CEM sums its k elites in index order: the reference's weighted sum over all N candidates adds
        // exact zeros for the others, which changes no bit, unless one of them is inf or NaN (0 * inf is
        // NaN), so any non-finite sample takes the full sum
        uint32_t non_finite = 0;   // an exponent of all ones (inf, NaN) anywhere: a loop that vectorizes
        if (!mppi) {
          for (int64_t i = 0; i < N * P; ++i) {
            const float f = static_cast<float>(xe[i]);
            uint32_t bits;
            std::memcpy(&bits, &f, sizeof bits);
            non_finite |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
          }
        }
        if (!mppi && !non_finite) {
          for (int64_t j = 0; j < k; ++j) accumulate(order[j], inv_k);
        } else {
          if (!mppi) {
            std::fill(w.begin(), w.end(), 0.0f);
            for (int64_t j = 0; j < k; ++j) w[order[j]] = inv_k;
          }
          for (int64_t i = 0; i < N; ++i) accumulate(i, w[i]);
        }
        const float* me = m.const_data_ptr<float>() + e * P;
        const float* se = s.const_data_ptr<float>() + e * P;
        float* nm = new_mean.mutable_data_ptr<float>() + e * P;
        float* ns = new_std.mutable_data_ptr<float>() + e * P;
        for (int64_t p = 0; p < P; ++p) {
          const float mu = static_cast<float>(s1[p]);
          nm[p] = mom * me[p] + rest * mu;
          if (mppi) {
            ns[p] = se[p];
          } else {
            const float var = static_cast<float>(s2[p] - s1[p] * s1[p]);
            const float sigma = std::sqrt(nan_max(var, 0.0f));   // clamp_min(0) keeps a NaN
            ns[p] = nan_max(mom * se[p] + rest * sigma, floor_std);
          }
        }
      }
    });
  });
  return {new_mean, new_std, best_cost, best_index};
}

}  // namespace jepa_engine
