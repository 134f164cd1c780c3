// The EMA of a target encoder, jepa_engine::ema_update_: its schema and its CPU kernel. The specification
// is kernels/ema.py (ema_update_reference, and _ema_foreach, the torch._foreach_lerp_ path this replaces on
// the CPU): per element, in fp32 whatever the storage, with w = 1 - m rounded to fp32,
//   w == 0: the target is not written (bit for bit unchanged);
//   w == 1: target = online (same dtype: the bits; else rounded to the target dtype, nearest even);
//   else:   target = torch.lerp(target, online, w), the two-sided form: t + w (o - t) for w < 0.5,
//           o - (o - t)(1 - w) otherwise.
// torch.lerp's CPU kernel computes each side as one fused multiply-add wherever ATen runs a vectorized
// capability (AVX2, AVX512 on x86; NEON on ARM), and unfused under ATEN_CPU_CAPABILITY=default: the kernel
// follows at::get_cpu_capability() to round as it does (this file is built with -ffp-contract=off, so the
// only fused operations are the explicit ones). Buffers are copied; the distance sum((t - o)^2) over the
// targets, before the update, is accumulated in double over fixed segments and summed in segment order,
// so it does not depend on the thread count.
//
// One pass over memory: every averaged tensor and floating buffer is a piece of one element range, cut
// into fixed segments that at::parallel_for shares among the threads (a segment may span several small
// tensors, so a model of many biases and norms splits as evenly as one large matrix).
#include "checks.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace jepa_engine {
namespace {

constexpr const char* kOp = "ema_update_";

// --------------------------------------------------------------------------------------------------
// Argument checks: kernels/ema.py's _check_momentum and _check_lists, in their order, with their
// exception types and messages.
// --------------------------------------------------------------------------------------------------
// str(dtype) without "torch.": checks.h's names plus the complex and unsigned ones.
std::string py_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kComplexHalf: return "complex32";
    case c10::kComplexFloat: return "complex64";
    case c10::kComplexDouble: return "complex128";
    case c10::kUInt16: return "uint16";
    case c10::kUInt32: return "uint32";
    case c10::kUInt64: return "uint64";
    default: return dtype_name(t);
  }
}

// Python's repr of a tuple of ints: "()", "(3,)", "(3, 1)".
std::string py_tuple(c10::IntArrayRef v) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << (v.size() == 1 ? ",)" : ")");
  return s.str();
}

bool is_float(c10::ScalarType t) { return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16; }

// Both dense (no gaps, no overlap) with the same strides: element k of one's memory is element k of the
// other's (kernels/ema.py _dense_like).
bool dense_like(const at::Tensor& t, const at::Tensor& o) {
  if (t.strides() != o.strides()) return false;
  if (t.is_contiguous()) return o.is_contiguous();
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 0) span += (t.size(d) - 1) * t.stride(d);
  }
  if (span != t.numel()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) <= 0) return false;
  }
  return true;
}

// Returns the momentum's value (read once: a CPU tensor, as the device check makes it here).
double check_momentum(const at::Tensor& m, const c10::Device& device) {
  TORCH_CHECK_TYPE(m.numel() == 1 && m.is_floating_point(), kOp, ": momentum tensor must be one floating element, "
                   "got dtype ", py_dtype(m.scalar_type()), " shape ", fmt_shape(m.sizes()));
  TORCH_CHECK_VALUE(m.device() == device, kOp, ": momentum tensor must be on ", device.str(), " like targets, got ",
                    m.device().str());
  TORCH_CHECK(m.device().is_cpu(), kOp, ": the CPU kernel got a momentum on ", m.device().str());
  double v = 0.0;
  switch (m.scalar_type()) {
    case c10::kFloat: v = *m.const_data_ptr<float>(); break;
    case c10::kDouble: v = *m.const_data_ptr<double>(); break;
    case c10::kHalf: v = static_cast<float>(*m.const_data_ptr<c10::Half>()); break;
    case c10::kBFloat16: v = static_cast<float>(*m.const_data_ptr<c10::BFloat16>()); break;
    default: v = m.item<double>();
  }
  TORCH_CHECK_VALUE(0.0 <= v && v <= 1.0, kOp, ": momentum must be in [0, 1], got ", py_float(v));
  return v;
}

void check_lists(at::TensorList targets, at::TensorList onlines, const char* tname, const char* oname, bool floating,
                 const c10::Device& device) {
  TORCH_CHECK_VALUE(targets.size() == onlines.size(), kOp, ": ", oname, " must have one tensor per ", tname,
                    " entry (", targets.size(), "), got ", onlines.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& t = targets[i];
    const at::Tensor& o = onlines[i];
    for (int side = 0; side < 2; ++side) {
      const at::Tensor& x = side ? o : t;
      const char* base = side ? oname : tname;
      TORCH_CHECK_TYPE(!floating || is_float(x.scalar_type()), kOp, ": ", base, "[", i, "] must have dtype in "
                       "(float32, float16, bfloat16), got ", py_dtype(x.scalar_type()));
      TORCH_CHECK_VALUE(x.device() == device, kOp, ": ", base, "[", i, "] must be on ", device.str(), " like ", tname,
                        "[0], got ", x.device().str());
    }
    TORCH_CHECK_VALUE(t.sizes() == o.sizes(), kOp, ": ", oname, "[", i, "] must have the shape of ", tname, "[", i,
                      "] ", fmt_shape(t.sizes()), ", got ", fmt_shape(o.sizes()));
    TORCH_CHECK_VALUE(!t.requires_grad(), kOp, ": ", tname, "[", i, "] must not require grad (the target is updated "
                      "in place by the EMA, not trained), got requires_grad=True");
    TORCH_CHECK_VALUE(dense_like(t, o), kOp, ": ", tname, "[", i, "] and ", oname, "[", i, "] must be dense with "
                      "equal strides, got strides ", py_tuple(t.strides()), " and ", py_tuple(o.strides()));
  }
}

// --------------------------------------------------------------------------------------------------
// Element ranges. A range function updates n elements from t / o (already offset) and returns its
// distance partial: kMode says what it writes, kDist whether it accumulates (o - t)^2.
// --------------------------------------------------------------------------------------------------
enum Mode : int { kNone = 0, kLerp = 1, kCopy = 2 };  // kNone: the distance only (w == 0)
using RangeFn = double (*)(void* t, const void* o, int64_t n, float w);

template <class T>
inline float widen(T x) { return static_cast<float>(x); }

// The portable loop: c10's conversions (fp32 -> 16 bits rounds to nearest even); kFused: the two sides of
// the lerp as std::fma, else as ATen's scalar code writes them, each operation rounded.
template <class T, class O, int kMode, bool kDist, bool kFused>
double scalar_range(void* tv, const void* ov, int64_t n, float w) {
  T* t = static_cast<T*>(tv);
  const O* o = static_cast<const O*>(ov);
  const bool small = w < 0.5f;
  double acc = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    if constexpr (kMode == kCopy && !kDist && std::is_same_v<T, O>) {
      t[k] = o[k];
      continue;
    }
    const float tf = widen(t[k]), of = widen(o[k]);
    const float d = of - tf;
    if constexpr (kDist) {
      const float dd = d * d;
      acc += static_cast<double>(dd);
    }
    if constexpr (kMode == kLerp) {
      float r;
      if constexpr (kFused) {
        r = small ? std::fma(w, d, tf) : std::fma(w - 1.0f, d, of);
      } else {
        r = small ? tf + w * d : of - d * (1.0f - w);
      }
      t[k] = static_cast<T>(r);
    } else if constexpr (kMode == kCopy) {
      if constexpr (std::is_same_v<T, O>) {
        t[k] = o[k];
      } else {
        t[k] = static_cast<T>(of);
      }
    }
  }
  return acc;
}

#if defined(__x86_64__)
#define JEPA_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 elements of a storage type: raw load / store, and the exact widening to fp32 / rounding from fp32.
template <class T>
struct Vec8;

template <>
struct Vec8<float> {
  using raw = __m256;
  JEPA_AVX2 static raw load(const float* p) { return _mm256_loadu_ps(p); }
  JEPA_AVX2 static void store(float* p, raw v) { _mm256_storeu_ps(p, v); }
  JEPA_AVX2 static __m256 widen(raw v) { return v; }
  JEPA_AVX2 static raw narrow(__m256 v) { return v; }
};

template <>
struct Vec8<c10::BFloat16> {
  using raw = __m128i;
  JEPA_AVX2 static raw load(const c10::BFloat16* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  JEPA_AVX2 static void store(c10::BFloat16* p, raw v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  JEPA_AVX2 static __m256 widen(raw v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  // c10::BFloat16(float): bits + 0x7FFF + (bit 16), the top half; a NaN becomes 0x7FC0.
  JEPA_AVX2 static raw narrow(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    // [r0..r3, r0..r3 | r4..r7, r4..r7] as 16-bit lanes, then the first quarter of each half.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }
};

template <>
struct Vec8<c10::Half> {
  using raw = __m128i;
  JEPA_AVX2 static raw load(const c10::Half* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  JEPA_AVX2 static void store(c10::Half* p, raw v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  JEPA_AVX2 static __m256 widen(raw v) { return _mm256_cvtph_ps(v); }
  JEPA_AVX2 static raw narrow(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};

// 8 elements: the same arithmetic as scalar_range<..., kFused = true>, 8 lanes at a time.
template <class T, class O, int kMode, bool kDist>
JEPA_AVX2 inline void avx2_step(T* t, const O* o, __m256 coeff, bool small, __m256d& acc0, __m256d& acc1) {
  const typename Vec8<O>::raw oraw = Vec8<O>::load(o);
  if constexpr (kMode == kCopy && !kDist) {
    if constexpr (std::is_same_v<T, O>) {
      Vec8<T>::store(t, oraw);
    } else {
      Vec8<T>::store(t, Vec8<T>::narrow(Vec8<O>::widen(oraw)));
    }
    return;
  }
  const __m256 of = Vec8<O>::widen(oraw);
  const __m256 tf = Vec8<T>::widen(Vec8<T>::load(t));
  const __m256 d = _mm256_sub_ps(of, tf);
  if constexpr (kDist) {
    const __m256 dd = _mm256_mul_ps(d, d);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(dd)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(dd, 1)));
  }
  if constexpr (kMode == kLerp) {
    Vec8<T>::store(t, Vec8<T>::narrow(_mm256_fmadd_ps(coeff, d, small ? tf : of)));
  } else if constexpr (kMode == kCopy) {
    if constexpr (std::is_same_v<T, O>) {
      Vec8<T>::store(t, oraw);
    } else {
      Vec8<T>::store(t, Vec8<T>::narrow(of));
    }
  }
}

// AVX2 + FMA + F16C: full groups of 8 in place; the last n % 8 through a zero-padded copy (zeros add
// nothing to the distance), so every element takes the same instructions.
template <class T, class O, int kMode, bool kDist>
JEPA_AVX2 double avx2_range(void* tv, const void* ov, int64_t n, float w) {
  T* t = static_cast<T*>(tv);
  const O* o = static_cast<const O*>(ov);
  const bool small = w < 0.5f;
  const __m256 coeff = _mm256_set1_ps(small ? w : w - 1.0f);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) avx2_step<T, O, kMode, kDist>(t + k, o + k, coeff, small, acc0, acc1);
  if (k < n) {
    T tb[8] = {};
    O ob[8] = {};
    const int64_t rest = n - k;
    std::memcpy(tb, t + k, rest * sizeof(T));
    std::memcpy(ob, o + k, rest * sizeof(O));
    avx2_step<T, O, kMode, kDist>(tb, ob, coeff, small, acc0, acc1);
    if constexpr (kMode != kNone) std::memcpy(t + k, tb, rest * sizeof(T));
  }
  if constexpr (!kDist) {
    return 0.0;
  } else {
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
    return ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3];
  }
}
#endif  // __x86_64__

enum class Impl { kAvx2, kScalarFused, kScalarPlain };

// The implementation that rounds as this process's torch.lerp does (see the top of the file).
Impl pick_impl() {
  static const Impl impl = [] {
    const bool fused = at::get_cpu_capability() != "DEFAULT";
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (fused && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      return Impl::kAvx2;
    }
    return fused ? Impl::kScalarFused : Impl::kScalarPlain;
#else
    (void)fused;
    return Impl::kScalarFused;  // ARM: NEON's fused multiply-add in every capability
#endif
  }();
  return impl;
}

template <class T, class O, int kMode, bool kDist>
RangeFn range_fn(Impl impl) {
#if defined(__x86_64__)
  if (impl == Impl::kAvx2) return &avx2_range<T, O, kMode, kDist>;
#endif
  return impl == Impl::kScalarPlain ? &scalar_range<T, O, kMode, kDist, false>
                                    : &scalar_range<T, O, kMode, kDist, true>;
}

template <class T, class O>
RangeFn range_fn(Impl impl, Mode mode, bool dist) {
  switch (mode) {
    case kNone: return range_fn<T, O, kNone, true>(impl);
    case kLerp: return dist ? range_fn<T, O, kLerp, true>(impl) : range_fn<T, O, kLerp, false>(impl);
    default: return dist ? range_fn<T, O, kCopy, true>(impl) : range_fn<T, O, kCopy, false>(impl);
  }
}

template <class T>
RangeFn range_fn(Impl impl, c10::ScalarType od, Mode mode, bool dist) {
  switch (od) {
    case c10::kFloat: return range_fn<T, float>(impl, mode, dist);
    case c10::kHalf: return range_fn<T, c10::Half>(impl, mode, dist);
    default: return range_fn<T, c10::BFloat16>(impl, mode, dist);
  }
}

RangeFn range_fn(Impl impl, c10::ScalarType td, c10::ScalarType od, Mode mode, bool dist) {
  switch (td) {
    case c10::kFloat: return range_fn<float>(impl, od, mode, dist);
    case c10::kHalf: return range_fn<c10::Half>(impl, od, mode, dist);
    default: return range_fn<c10::BFloat16>(impl, od, mode, dist);
  }
}

// One tensor's dense memory in the shared element range.
struct Piece {
  char* t;
  const char* o;
  int64_t t_size, o_size;  // bytes per element
  RangeFn fn;
};

// 16384 elements a segment; a thread takes at least 2 (32768 elements, ATen's grain size): below that
// waking the other threads costs more than it saves.
constexpr int64_t kSegment = 1 << 14;
constexpr int64_t kGrainSegments = 2;

at::Tensor ema_update_cpu(at::TensorList targets, at::TensorList onlines, const at::Tensor& momentum,
                          at::TensorList target_buffers, at::TensorList online_buffers, bool return_distance) {
  TORCH_CHECK_VALUE(!targets.empty(), kOp, ": targets must be a non-empty list or tuple of tensors, got list of "
                    "length 0");
  const c10::Device device = targets[0].device();
  const double momentum_value = check_momentum(momentum, device);
  check_lists(targets, onlines, "targets", "onlines", true, device);
  check_lists(target_buffers, online_buffers, "target_buffers", "online_buffers", false, device);

  const float m = static_cast<float>(momentum_value);  // as torch.tensor(m, dtype=float32) rounds it
  const float w = 1.0f - m;
  const Impl impl = pick_impl();
  std::vector<Piece> pieces;
  std::vector<int64_t> starts;  // first element of each piece in the shared range; one past the last at the end
  int64_t total = 0;
  auto add = [&](const at::Tensor& t, const at::Tensor& o, Mode mode, bool dist) {
    if (t.numel() == 0 || (mode == kNone && !dist)) return;
    pieces.push_back({static_cast<char*>(t.data_ptr()), static_cast<const char*>(o.data_ptr()),
                      static_cast<int64_t>(t.element_size()), static_cast<int64_t>(o.element_size()),
                      range_fn(impl, t.scalar_type(), o.scalar_type(), mode, dist)});
    starts.push_back(total);
    total += t.numel();
  };
  const Mode target_mode = w == 0.0f ? kNone : (w == 1.0f ? kCopy : kLerp);
  for (size_t i = 0; i < targets.size(); ++i) add(targets[i], onlines[i], target_mode, return_distance);
  std::vector<size_t> other_buffers;  // integer (or float64) buffers: copied by ATen
  for (size_t i = 0; i < target_buffers.size(); ++i) {
    if (is_float(target_buffers[i].scalar_type()) && is_float(online_buffers[i].scalar_type())) {
      add(target_buffers[i], online_buffers[i], kCopy, false);
    } else {
      other_buffers.push_back(i);
    }
  }
  starts.push_back(total);

  const int64_t n_segments = (total + kSegment - 1) / kSegment;
  std::vector<double> partial(return_distance ? n_segments : 0, 0.0);
  at::parallel_for(0, n_segments, kGrainSegments, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int64_t lo = s * kSegment;
      const int64_t hi = std::min(lo + kSegment, total);
      size_t p = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin()) - 1;
      double acc = 0.0;
      for (; lo < hi; ++p) {
        const Piece& piece = pieces[p];
        const int64_t a = lo - starts[p];
        const int64_t b = std::min(hi, starts[p + 1]) - starts[p];
        acc += piece.fn(piece.t + a * piece.t_size, piece.o + a * piece.o_size, b - a, w);
        lo = starts[p] + b;
      }
      if (return_distance) partial[s] = acc;
    }
  });
  for (size_t i : other_buffers) target_buffers[i].copy_(online_buffers[i]);
  double dist = 0.0;
  for (double x : partial) dist += x;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.mutable_data_ptr<float>() = static_cast<float>(dist);
  return out;
}

}  // namespace
}  // namespace jepa_engine

TORCH_LIBRARY_FRAGMENT(jepa_engine, m) {
  m.def("ema_update_(Tensor(a!)[] targets, Tensor[] onlines, Tensor momentum, Tensor(b!)[] target_buffers, "
        "Tensor[] online_buffers, bool return_distance) -> Tensor");
}

TORCH_LIBRARY_IMPL(jepa_engine, CPU, m) {
  m.impl("ema_update_", &jepa_engine::ema_update_cpu);
}
