// Schemas and CPU kernels of the loss family: latent_loss (the JEPA training loss between predicted and
// target embeddings) and latent_cost (a rollout's distance to the goal embedding). The specification is
// each op's PyTorch reference, latent_loss_reference in kernels/latent_loss.py and latent_cost_reference in
// kernels/latent_cost.py; the argument checks are those of the public Python functions, in the same order,
// with the same exception types and messages.
//
// Both kernels read each needed input element once, in fp32 whatever the storage dtype (fp32, fp16, bf16),
// straight from the inputs' strides (no copy, no temporary of the input size). A row's sum over the
// features runs in 16 fp32 partial sums (two 8-lane vectors) combined by a fixed tree, sums over rows
// (per fixed block of rows, then the blocks in order) or steps in double; the split of the work between
// threads never changes a sum's order, so the result is the same bit for bit from run to run, whatever
// the number of threads and on AVX2 or not. The elementwise losses are the reference's formulas (ATen's
// smooth_l1: 0.5 z z / beta or z - 0.5 beta), built with -ffp-contract=off. latent_loss rows run in
// parallel over blocks of rows, latent_cost over rows (at::parallel_for, one thread below 32k elements).
#include "checks.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#define JEPA_INLINE inline __attribute__((always_inline))
// The 32-byte vectors below are passed only between always-inlined functions of this file: GCC's note
// that their calling convention differs without AVX concerns no call that exists.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace jepa_engine {
namespace {

// ---------------------------------------------------------------------------------------------------
// Argument checks of the public Python functions that checks.h does not have (a minimum rank instead of
// an exact one, or no rank; Python's repr of a str and of a float).
// ---------------------------------------------------------------------------------------------------
// _launch.check_tensor(op, name, t, min_ndim=..., dtypes=..., device=...): rank (min_ndim < 0: none),
// dtype, device, non-empty, in that order.
void check_tensor_min_ndim(const char* op, const char* name, const at::Tensor& t, int64_t min_ndim,
                           std::initializer_list<c10::ScalarType> dtypes, const std::optional<c10::Device>& device) {
  TORCH_CHECK_VALUE(min_ndim < 0 || t.dim() >= min_ndim, op, ": ", name, " must have at least ", min_ndim,
                    " dims, got shape ", fmt_shape(t.sizes()));
  check_dtype_device(op, name, t, dtypes, device, /*nonempty=*/true);
}

// Python's repr of a tuple of str: "('smooth_l1', 'l2')".
std::string py_tuple(std::initializer_list<const char*> items) {
  std::string out = "(";
  for (const char* it : items) out += (out.size() > 1 ? ", " : "") + py_str(it);
  return out + (items.size() == 1 ? ",)" : ")");
}

// ---------------------------------------------------------------------------------------------------
// Eight fp32 lanes as a GCC vector: lane-wise IEEE arithmetic, compiled to two SSE registers on any x86-64
// and to one AVX register in the AVX2 clones below (the same operations, so the same bits).
// ---------------------------------------------------------------------------------------------------
constexpr int kW = 8;
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
typedef uint16_t vh __attribute__((vector_size(2 * kW)));

// Eight values of a storage dtype as fp32; the conversions are exact.
JEPA_INLINE vf load8(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

JEPA_INLINE vu load8_bits16(const void* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vu) << 16;
}

JEPA_INLINE vf load8(const c10::BFloat16* p) { return reinterpret_cast<vf>(load8_bits16(p)); }

// IEEE half -> float: c10::detail::fp16_ieee_to_fp32_value's arithmetic, lane-wise (subnormals included).
JEPA_INLINE vf load8(const c10::Half* p) {
  const vu w = load8_bits16(p);
  const vu sign = w & 0x80000000u;
  const vu two_w = w + w;
  const vf normalized = reinterpret_cast<vf>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vf denormalized = reinterpret_cast<vf>((two_w >> 17) | (126u << 23)) - 0.5f;
  const vi tiny = two_w < (1u << 27);
  return reinterpret_cast<vf>(sign | (tiny ? reinterpret_cast<vu>(denormalized) : reinterpret_cast<vu>(normalized)));
}

// Eight values a[i * s], i < n (n <= kW; the missing lanes are 0), through a small copy.
template <typename T>
JEPA_INLINE vf load8_strided(const T* a, int64_t s, int n) {
  T tmp[kW] = {};
  for (int i = 0; i < n; ++i) tmp[i] = a[i * s];
  return load8(tmp);
}

// ---------------------------------------------------------------------------------------------------
// The elementwise losses / distances of x = a - b, lane-wise; each gives 0 at x = 0 (the tails' padding).
// ---------------------------------------------------------------------------------------------------
JEPA_INLINE vf vabs(vf x) { return reinterpret_cast<vf>(reinterpret_cast<vu>(x) & 0x7fffffffu); }

struct Square {
  JEPA_INLINE vf operator()(vf x) const { return x * x; }
};

struct Abs {
  JEPA_INLINE vf operator()(vf x) const { return vabs(x); }
};

// ATen's smooth_l1 for beta > 0 (beta = 0 is Abs, as in the reference): z < beta ? 0.5 z z / beta : z - 0.5 beta.
struct SmoothL1 {
  float beta, half_beta;
  JEPA_INLINE vf operator()(vf x) const {
    const vf z = vabs(x);
    const vf quad = 0.5f * z * z / beta, lin = z - half_beta;
    return z < beta ? quad : lin;
  }
};

// sum_d f(a[d * sa] - b[d * sb]) over d < D in fp32: two vectors of partial sums (16 lanes), then a fixed
// tree. kUnit: both feature strides are 1 (contiguous features, the common case).
template <bool kUnit, typename T, typename F>
JEPA_INLINE float row_sum(const T* a, int64_t sa, const T* b, int64_t sb, int64_t D, const F& f) {
  vf acc0 = {}, acc1 = {};
  int64_t d = 0;
  const int64_t s_a = kUnit ? 1 : sa, s_b = kUnit ? 1 : sb;
  if constexpr (kUnit) {
    for (; d + 2 * kW <= D; d += 2 * kW) {
      acc0 += f(load8(a + d) - load8(b + d));
      acc1 += f(load8(a + d + kW) - load8(b + d + kW));
    }
  } else {
    for (; d + 2 * kW <= D; d += 2 * kW) {
      acc0 += f(load8_strided(a + d * sa, sa, kW) - load8_strided(b + d * sb, sb, kW));
      acc1 += f(load8_strided(a + (d + kW) * sa, sa, kW) - load8_strided(b + (d + kW) * sb, sb, kW));
    }
  }
  // the tail: up to 15 values, zero-padded
  if (d < D) {
    const int n0 = static_cast<int>(std::min<int64_t>(kW, D - d));
    acc0 += f(load8_strided(a + d * s_a, s_a, n0) - load8_strided(b + d * s_b, s_b, n0));
    d += n0;
  }
  if (d < D) {
    const int n1 = static_cast<int>(D - d);
    acc1 += f(load8_strided(a + d * s_a, s_a, n1) - load8_strided(b + d * s_b, s_b, n1));
  }
  const vf s = acc0 + acc1;
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

// The rows of a [..., D] tensor (and of its [...] mask): the leading dims, merged where the strides of
// every operand allow, walked as an odometer of element offsets.
struct RowWalk {
  static constexpr int kMaxOperands = 3;
  c10::SmallVector<int64_t, 6> size;
  c10::SmallVector<int64_t, 6> stride[kMaxOperands];
  int operands = 0;

  RowWalk(c10::IntArrayRef sizes, std::initializer_list<c10::IntArrayRef> strides) {
    operands = static_cast<int>(strides.size());
    for (size_t k = 0; k < sizes.size(); ++k) {
      if (sizes[k] == 1) continue;
      // dim k merges into the previous kept dim when, for every operand, stepping that dim once is
      // stepping dim k sizes[k] times
      bool merge = !size.empty();
      int o = 0;
      for (auto st : strides) {
        merge = merge && stride[o].back() == st[k] * sizes[k];
        ++o;
      }
      o = 0;
      for (auto st : strides) {
        if (merge) {
          stride[o].back() = st[k];
        } else {
          stride[o].push_back(st[k]);
        }
        ++o;
      }
      if (merge) {
        size.back() *= sizes[k];
      } else {
        size.push_back(sizes[k]);
      }
    }
  }

  // Offsets of row `row` of each operand.
  void offsets(int64_t row, int64_t* off) const {
    for (int o = 0; o < operands; ++o) off[o] = 0;
    for (int k = static_cast<int>(size.size()) - 1; k >= 0; --k) {
      const int64_t i = row % size[k];
      row /= size[k];
      for (int o = 0; o < operands; ++o) off[o] += i * stride[o][k];
    }
  }
};

// An odometer over RowWalk's dims from a first row: next() moves every operand's offset by one row.
struct RowCursor {
  const RowWalk& walk;
  int64_t off[RowWalk::kMaxOperands];
  c10::SmallVector<int64_t, 6> idx;

  RowCursor(const RowWalk& w, int64_t row) : walk(w), idx(w.size.size()) {
    walk.offsets(row, off);
    for (int k = static_cast<int>(w.size.size()) - 1; k >= 0; --k) {
      idx[k] = row % w.size[k];
      row /= w.size[k];
    }
  }

  JEPA_INLINE void next() {
    for (int k = static_cast<int>(idx.size()) - 1; k >= 0; --k) {
      for (int o = 0; o < walk.operands; ++o) off[o] += walk.stride[o][k];
      if (++idx[k] < walk.size[k]) return;
      for (int o = 0; o < walk.operands; ++o) off[o] -= walk.size[k] * walk.stride[o][k];
      idx[k] = 0;
    }
  }
};

constexpr int64_t kBlockElems = 1 << 13;  // latent_loss: elements per block of rows (one partial sum each)
constexpr int64_t kGrain = 1 << 15;       // elements per thread below which a loop stays on one thread

// ---------------------------------------------------------------------------------------------------
// latent_loss: per block of rows, sum_m keep[m] * (sum_d l(pred - target) / D) and sum_m keep[m].
// ---------------------------------------------------------------------------------------------------
struct LossArgs {
  const void* pred;
  const void* target;
  const bool* mask;  // nullptr: every row counts
  int64_t D, sp, st;  // features; feature strides of pred and target
  int64_t rows_per_block, rows;
  const RowWalk* walk;  // operands: pred, target (and mask)
  double* block_sum;
  int64_t* block_kept;
};

template <typename T, typename F>
JEPA_INLINE void loss_blocks(const LossArgs& a, const F& f, int64_t first, int64_t last) {
  const T* pred = static_cast<const T*>(a.pred);
  const T* target = static_cast<const T*>(a.target);
  const bool unit = a.sp == 1 && a.st == 1;
  const float fd = static_cast<float>(a.D);
  for (int64_t blk = first; blk < last; ++blk) {
    const int64_t r0 = blk * a.rows_per_block, r1 = std::min(a.rows, r0 + a.rows_per_block);
    RowCursor cur(*a.walk, r0);
    double sum = 0.0;
    int64_t kept = 0;
    for (int64_t r = r0; r < r1; ++r, cur.next()) {
      const T* p = pred + cur.off[0];
      const T* t = target + cur.off[1];
      const float s = unit ? row_sum<true>(p, 1, t, 1, a.D, f) : row_sum<false>(p, a.sp, t, a.st, a.D, f);
      // the reference's per-token mean (sum / D in fp32), times keep: a NaN row counts even where the
      // mask drops it (NaN * 0), as in the reference
      const float row = s / fd;
      if (a.mask) {
        const bool keep = a.mask[cur.off[2]];
        sum += static_cast<double>(row * (keep ? 1.0f : 0.0f));
        kept += keep;
      } else {
        sum += static_cast<double>(row);
      }
    }
    a.block_sum[blk] = sum;
    a.block_kept[blk] = kept;
  }
}

// ---------------------------------------------------------------------------------------------------
// latent_cost: cost[b] = sum_h w[h] * sum_d dist(z[b, h] - goal[b / rows_per_goal]) over the steps read.
// ---------------------------------------------------------------------------------------------------
struct CostArgs {
  const void* z;
  const void* goal;
  const float* weights;  // nullptr: w = 1
  int64_t H, D, h0, rows_per_goal;
  int64_t zs0, zs1, zs2, gs0, gs1, ws0;
  float* cost;
};

template <typename T, typename F>
JEPA_INLINE void cost_rows(const CostArgs& a, const F& f, int64_t first, int64_t last) {
  const T* z = static_cast<const T*>(a.z);
  const T* goal = static_cast<const T*>(a.goal);
  const bool unit = a.zs2 == 1 && a.gs1 == 1;
  for (int64_t b = first; b < last; ++b) {
    const T* g = goal + (b / a.rows_per_goal) * a.gs0;
    double acc = 0.0;
    for (int64_t h = a.h0; h < a.H; ++h) {
      const T* zr = z + b * a.zs0 + h * a.zs1;
      const float dist = unit ? row_sum<true>(zr, 1, g, 1, a.D, f) : row_sum<false>(zr, a.zs2, g, a.gs1, a.D, f);
      acc += a.weights ? static_cast<double>(a.weights[h * a.ws0]) * static_cast<double>(dist)
                       : static_cast<double>(dist);
    }
    a.cost[b] = static_cast<float>(acc);
  }
}

// Each loop twice: for the AVX2 machines (8 floats a vector) and for any x86-64 / other CPU. The body is
// inlined into both, so the same C++ compiles to each instruction set; the results are the same bits
// (the same operations in the same order; no FMA contraction).
template <typename T, typename F>
void loss_blocks_base(const LossArgs& a, const F& f, int64_t first, int64_t last) {
  loss_blocks<T>(a, f, first, last);
}

template <typename T, typename F>
void cost_rows_base(const CostArgs& a, const F& f, int64_t first, int64_t last) {
  cost_rows<T>(a, f, first, last);
}

#if defined(__x86_64__)
template <typename T, typename F>
__attribute__((target("avx2"))) void loss_blocks_avx2(const LossArgs& a, const F& f, int64_t first, int64_t last) {
  loss_blocks<T>(a, f, first, last);
}

template <typename T, typename F>
__attribute__((target("avx2"))) void cost_rows_avx2(const CostArgs& a, const F& f, int64_t first, int64_t last) {
  cost_rows<T>(a, f, first, last);
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2");
#endif

template <typename T, typename F>
void loss_blocks_best(const LossArgs& a, const F& f, int64_t first, int64_t last) {
#if defined(__x86_64__)
  if (kHaveAvx2) return loss_blocks_avx2<T>(a, f, first, last);
#endif
  loss_blocks_base<T>(a, f, first, last);
}

template <typename T, typename F>
void cost_rows_best(const CostArgs& a, const F& f, int64_t first, int64_t last) {
#if defined(__x86_64__)
  if (kHaveAvx2) return cost_rows_avx2<T>(a, f, first, last);
#endif
  cost_rows_base<T>(a, f, first, last);
}

// Calls fn(T{}) with T the C++ type of the storage dtype (checked to be one of the three before).
template <typename Fn>
void dispatch_storage(c10::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: return fn(float{});
  }
}

}  // namespace

at::Tensor latent_loss_cpu(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask,
                           c10::string_view kind, double beta) {
  const char* op = "latent_loss";
  const auto floats = {at::kFloat, at::kHalf, at::kBFloat16};
  check_tensor_min_ndim(op, "pred", pred, 2, floats, std::nullopt);
  const c10::Device dev = pred.device();
  check_tensor_min_ndim(op, "target", target, 2, floats, dev);
  check_shape(op, "target", target, pred.sizes(), "pred.shape");
  check_same_dtype(op, "target", target, "pred", pred);
  const c10::IntArrayRef lead = pred.sizes().slice(0, pred.dim() - 1);
  if (mask) {
    check_tensor_min_ndim(op, "mask", *mask, -1, {at::kBool}, dev);
    check_shape(op, "mask", *mask, lead, "pred.shape[:-1]");
  }
  const bool smooth = kind == "smooth_l1";
  TORCH_CHECK_VALUE(smooth || kind == "l2", op, ": kind must be one of ", py_tuple({"smooth_l1", "l2"}), ", got ",
                    py_str(kind));
  TORCH_CHECK_VALUE(beta >= 0.0, op, ": beta must be >= 0, got ", py_float(beta));

  const int64_t D = pred.size(-1), M = pred.numel() / D;
  const RowWalk walk = mask ? RowWalk(lead, {pred.strides(), target.strides(), mask->strides()})
                            : RowWalk(lead, {pred.strides(), target.strides()});
  LossArgs a{};
  a.pred = pred.const_data_ptr();
  a.target = target.const_data_ptr();
  a.mask = mask ? mask->const_data_ptr<bool>() : nullptr;
  a.D = D;
  a.sp = pred.stride(-1);
  a.st = target.stride(-1);
  a.rows = M;
  a.rows_per_block = std::max<int64_t>(1, kBlockElems / D);
  a.walk = &walk;
  const int64_t blocks = (M + a.rows_per_block - 1) / a.rows_per_block;
  std::vector<double> block_sum(blocks);
  std::vector<int64_t> block_kept(blocks);
  a.block_sum = block_sum.data();
  a.block_kept = block_kept.data();
  const int64_t grain = std::max<int64_t>(1, kGrain / (a.rows_per_block * D));

  dispatch_storage(pred.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](const auto& f) {
      at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) { loss_blocks_best<T>(a, f, b, e); });
    };
    if (smooth && beta > 0.0) {
      const float fb = static_cast<float>(beta);
      run(SmoothL1{fb, 0.5f * fb});
    } else if (smooth) {
      run(Abs{});
    } else {
      run(Square{});
    }
  });

  // the blocks in order: the same sum whatever the threads
  double sum = 0.0;
  int64_t kept = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    sum += block_sum[i];
    kept += block_kept[i];
  }
  const double count = mask ? static_cast<double>(std::max<int64_t>(kept, 1)) : static_cast<double>(M);
  at::Tensor out = at::empty({}, pred.options().dtype(at::kFloat));
  *out.mutable_data_ptr<float>() = static_cast<float>(sum / count);
  return out;
}

at::Tensor latent_cost_cpu(const at::Tensor& z, const at::Tensor& goal, const std::optional<at::Tensor>& weights,
                           c10::string_view metric, c10::string_view reduce) {
  const char* op = "latent_cost";
  check_tensor(op, "z", z, 3, {at::kFloat, at::kHalf, at::kBFloat16}, std::nullopt);
  const int64_t B = z.size(0), H = z.size(1), D = z.size(2);
  const c10::Device dev = z.device();
  check_tensor(op, "goal", goal, 2, {at::kFloat, at::kHalf, at::kBFloat16}, dev);
  check_same_dtype(op, "goal", goal, "z", z);
  const int64_t G = goal.size(0);
  TORCH_CHECK_VALUE(goal.size(1) == D, op, ": goal must be [G, D] with D = ", D, " (z's embedding dim), got ",
                    fmt_shape(goal.sizes()));
  TORCH_CHECK_VALUE(B % G == 0, op, ": goal rows G = ", G, " must divide the batch B = ", B, " (z is ",
                    fmt_shape(z.sizes()), ")");
  const bool l1 = metric == "l1";
  TORCH_CHECK_VALUE(l1 || metric == "l2", op, ": metric must be one of ", py_tuple({"l2", "l1"}), ", got ",
                    py_str(metric));
  const bool final_step = reduce == "final";
  TORCH_CHECK_VALUE(final_step || reduce == "sum", op, ": reduce must be one of ", py_tuple({"final", "sum"}),
                    ", got ", py_str(reduce));
  if (weights) {
    TORCH_CHECK_VALUE(!final_step, op, ": weights apply to reduce='sum' only, got reduce=", py_str(reduce));
    check_tensor(op, "weights", *weights, 1, {at::kFloat}, dev);
    check_shape(op, "weights", *weights, {H}, "[H]");
  }

  at::Tensor cost = at::empty({B}, z.options().dtype(at::kFloat));
  CostArgs a{};
  a.z = z.const_data_ptr();
  a.goal = goal.const_data_ptr();
  a.weights = weights ? weights->const_data_ptr<float>() : nullptr;
  a.H = H;
  a.D = D;
  a.h0 = final_step ? H - 1 : 0;  // reduce="final" reads only the last step
  a.rows_per_goal = B / G;
  a.zs0 = z.stride(0);
  a.zs1 = z.stride(1);
  a.zs2 = z.stride(2);
  a.gs0 = goal.stride(0);
  a.gs1 = goal.stride(1);
  a.ws0 = weights ? weights->stride(0) : 0;
  a.cost = cost.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrain / ((H - a.h0) * D));

  dispatch_storage(z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](const auto& f) {
      at::parallel_for(0, B, grain, [&](int64_t b, int64_t e) { cost_rows_best<T>(a, f, b, e); });
    };
    if (l1) {
      run(Abs{});
    } else {
      run(Square{});
    }
  });
  return cost;
}

}  // namespace jepa_engine

TORCH_LIBRARY_FRAGMENT(jepa_engine, m) {
  m.def("latent_loss(Tensor pred, Tensor target, Tensor? mask, str kind, float beta) -> Tensor");
  m.def("latent_cost(Tensor z, Tensor goal, Tensor? weights, str metric, str reduce) -> Tensor");
}

TORCH_LIBRARY_IMPL(jepa_engine, CPU, m) {
  m.impl("latent_loss", &jepa_engine::latent_loss_cpu);
  m.impl("latent_cost", &jepa_engine::latent_cost_cpu);
}
