// CPU kernels of the inference-only ops fused_linear and linear_goal_cost; the specification is
// fused_linear_reference / linear_goal_cost_reference in kernels/fused_linear.py.
//
// The GEMM is ATen's addmm / mm (MKL or oneDNN, fp32 accumulation), the GELU ATen's exact-erf kernel,
// here in place on the GEMM's fresh output (the reference allocates a second output). Fused here:
// the fp32 layer norm without affine (one task per block of rows, read in place at any row stride,
// written once; 16-bit rows and column-strided x take torch's layer norm with a unit affine, as the
// reference does, so the normalized x is rounded to the storage dtype before the product), and the
// goal cost: one pass over z per row, summing (z - goal)^2 or |z - goal| in fp32 without the
// reference's difference tensor, its square_ and its sum. The argument checks are the public
// functions' (fused_linear, linear_goal_cost): the same order, the same exception types, the same
// messages, so a C++ caller gets the errors a Python caller gets. Built with -ffp-contract=off.
#include "checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace jepa_engine {
namespace {

constexpr const char* kLinear = "fused_linear";
constexpr const char* kCost = "linear_goal_cost";
constexpr std::initializer_list<c10::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16};
constexpr int64_t kGrain = 32768;   // elements a task of at::parallel_for, ATen's own grain

void check_grad(const char* op, const char* name, const c10::optional<at::Tensor>& t) {
  TORCH_CHECK_VALUE(!(t.has_value() && t->defined() && t->requires_grad()), op,
                    ": inference-only op (no backward), but ", name,
                    " requires grad while grad mode is on; call it under torch.no_grad() / "
                    "torch.inference_mode() or pass ", name, ".detach()");
}

struct Dims {
  int64_t M, K, N;
};

// fused_linear.py _check_common: x, weight, bias, eps, then the grad check over x, weight, bias and
// the op's other tensor (residual or goal).
Dims check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  double eps, const char* other_name, const c10::optional<at::Tensor>& other) {
  check_tensor(op, "x", x, 2, kFloatTypes, c10::nullopt);
  const int64_t M = x.size(0), K = x.size(1);
  check_tensor(op, "weight", weight, 2, kFloatTypes, x.device());
  check_same_dtype(op, "weight", weight, "x", x);
  const int64_t N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": weight must be [N, K] with K = ", K, " (x's last dim), got ",
                    fmt_shape(weight.sizes()));
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, 1, kFloatTypes, x.device());
    check_same_dtype(op, "bias", *bias, "x", x);
    check_shape(op, "bias", *bias, {N}, "[N]");
  }
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be a positive float, got ", py_float(eps));
  if (at::GradMode::is_enabled()) {
    check_grad(op, "x", x);
    check_grad(op, "weight", weight);
    check_grad(op, "bias", bias);
    check_grad(op, other_name, other);
  }
  return {M, K, N};
}

// Sum of sixteen lane sums added in a fixed tree: the lane loops of the callers vectorize.
constexpr int kLanes = 16;

inline float lane_total(float* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

// Layer norm without affine of fp32 rows [begin, end) of x (row stride sx, unit column stride) into the
// contiguous out: the mean, then the biased variance about it (two passes over a row that sits in L1),
// then (x - mean) * rstd, all in fp32.
__attribute__((target_clones("avx2", "default")))
void layer_norm_rows(const float* x, int64_t sx, int64_t K, float eps, int64_t begin, int64_t end, float* out) {
  for (int64_t m = begin; m < end; ++m) {
    const float* xr = x + m * sx;
    float* yr = out + m * K;
    float acc[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= K; d += kLanes) {
      for (int j = 0; j < kLanes; ++j) acc[j] += xr[d + j];
    }
    float sum = lane_total(acc);
    for (; d < K; ++d) sum += xr[d];
    const float mean = sum / static_cast<float>(K);
    float acc2[kLanes] = {};
    d = 0;
    for (; d + kLanes <= K; d += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float t = xr[d + j] - mean;
        acc2[j] += t * t;
      }
    }
    float sq = lane_total(acc2);
    for (; d < K; ++d) {
      const float t = xr[d] - mean;
      sq += t * t;
    }
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(K) + eps);
    for (d = 0; d < K; ++d) yr[d] = (xr[d] - mean) * rstd;
  }
}

// LN0(x) @ weight^T + bias in x's dtype, as fused_linear_reference computes it.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  bool normalize, double eps) {
  at::Tensor h = x;
  const int64_t M = x.size(0), K = x.size(1);
  if (normalize && x.scalar_type() == at::kFloat && x.stride(1) == 1) {
    h = at::empty({M, K}, x.options());
    const float* xp = x.const_data_ptr<float>();
    float* hp = h.mutable_data_ptr<float>();
    const int64_t sx = x.stride(0);
    const float e = static_cast<float>(eps);
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / K), [&](int64_t begin, int64_t end) {
      layer_norm_rows(xp, sx, K, e, begin, end, hp);
    });
  } else if (normalize) {
    // A unit affine is exact, and takes torch's fast layer-norm kernel (the path without weight and
    // bias is about twice as slow in torch 2.13), as the reference does.
    const auto opts = x.options();
    h = at::layer_norm(x, {K}, at::ones({K}, opts), at::zeros({K}, opts), eps, /*cudnn_enable=*/false);
  }
  return bias.has_value() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

// The cost of rows [begin, end) of the fp32 z [M, D] (contiguous) to their goal rows (fp32 [G, D],
// contiguous): sixteen lane sums per row (the compiler vectorizes the fixed-width lane loop) added in
// a fixed tree, then the tail; each row's sum is in the same order whatever the thread split.
__attribute__((target_clones("avx2", "default")))
void goal_cost_rows(const float* z, const float* goal, int64_t D, int64_t rows_per_goal, bool l1, int64_t begin,
                    int64_t end, float* cost) {
  constexpr int W = kLanes;
  for (int64_t m = begin; m < end; ++m) {
    const float* zr = z + m * D;
    const float* gr = goal + (m / rows_per_goal) * D;
    float acc[W] = {};
    int64_t d = 0;
    if (l1) {
      for (; d + W <= D; d += W) {
        for (int j = 0; j < W; ++j) acc[j] += std::fabs(zr[d + j] - gr[d + j]);
      }
    } else {
      for (; d + W <= D; d += W) {
        for (int j = 0; j < W; ++j) {
          const float t = zr[d + j] - gr[d + j];
          acc[j] += t * t;
        }
      }
    }
    float sum = lane_total(acc);
    for (; d < D; ++d) {
      const float t = zr[d] - gr[d];
      sum += l1 ? std::fabs(t) : t * t;
    }
    cost[m] = sum;
  }
}

at::Tensor fused_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            bool normalize, double eps, bool gelu, const c10::optional<at::Tensor>& residual) {
  const char* op = kLinear;
  const Dims s = check_common(op, x, weight, bias, eps, "residual", residual);
  if (residual.has_value()) {
    check_tensor(op, "residual", *residual, 2, kFloatTypes, x.device());
    check_same_dtype(op, "residual", *residual, "x", x);
    check_shape(op, "residual", *residual, {s.M, s.N}, "[M, N]");
  }
  at::Tensor y = linear(x, weight, bias, normalize, eps);
  if (gelu) at::gelu_(y);                       // exact erf GELU, in place on the GEMM's own output
  if (residual.has_value()) y.add_(*residual);
  return y;
}

std::tuple<at::Tensor, at::Tensor> linear_goal_cost_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& goal,
                                                        bool normalize, double eps, c10::string_view metric) {
  const char* op = kCost;
  const Dims s = check_common(op, x, weight, bias, eps, "goal", goal);
  const int64_t M = s.M, D = s.N;
  check_tensor(op, "goal", goal, 2, kFloatTypes, x.device());
  check_same_dtype(op, "goal", goal, "x", x);
  TORCH_CHECK_VALUE(goal.size(1) == D, op, ": goal must be [G, D] with D = ", D, " (weight's rows), got ",
                    fmt_shape(goal.sizes()));
  const int64_t G = goal.size(0);
  TORCH_CHECK_VALUE(M % G == 0, op, ": goal rows G = ", G, " must divide the rows M = ", M, " of x (x is ",
                    fmt_shape(x.sizes()), ")");
  const bool l1 = metric == "l1";
  TORCH_CHECK_VALUE(l1 || metric == "l2", op, ": metric must be one of ('l2', 'l1'), got ", py_str(metric));

  at::Tensor z = linear(x, weight, bias, normalize, eps).contiguous();
  // The cost is of z as returned (rounded to its dtype), in fp32: 16-bit z is widened once by ATen's
  // vectorized copy (the reference's difference buffer is the same size), fp32 z is read in place.
  const at::Tensor zf = z.scalar_type() == at::kFloat ? z : z.to(at::kFloat);
  const at::Tensor gf = goal.to(at::kFloat).contiguous();
  at::Tensor cost = at::empty({M}, x.options().dtype(at::kFloat));
  const float* zp = zf.const_data_ptr<float>();
  const float* gp = gf.const_data_ptr<float>();
  float* cp = cost.mutable_data_ptr<float>();
  const int64_t rows_per_goal = M / G;
  // kGrain in rows: small problems run on the calling thread.
  const int64_t grain = std::max<int64_t>(1, kGrain / D);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    goal_cost_rows(zp, gp, D, rows_per_goal, l1, begin, end, cp);
  });
  return {z, cost};
}

}  // namespace
}  // namespace jepa_engine

TORCH_LIBRARY_FRAGMENT(jepa_engine, m) {
  m.def("fused_linear(Tensor x, Tensor weight, Tensor? bias, bool normalize, float eps, bool gelu, "
        "Tensor? residual) -> Tensor");
  m.def("linear_goal_cost(Tensor x, Tensor weight, Tensor? bias, Tensor goal, bool normalize, float eps, "
        "str metric) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jepa_engine, CPU, m) {
  m.impl("fused_linear", &jepa_engine::fused_linear_cpu);
  m.impl("linear_goal_cost", &jepa_engine::linear_goal_cost_cpu);
}
