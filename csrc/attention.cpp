// The masked attention forward: schema and CPU kernel. The specification is kernels/masked_attention.py
// (its reference, `_reference_forward`): softmax attention over the allowed keys in fp32, a row with no
// allowed key gives 0, and the log-sum-exp of each row in base 2 (+inf for such a row) in the Triton
// kernel's layout, which the Python backward reads. The output of the 4-D form is [B, H, N_q, D] on
// [B, N_q, H, D] memory, as the Triton kernel writes it (a free reshape to [B, N_q, H * D]).
//
// The attention itself is ATen's fused CPU kernel (flash attention, the kernel the reference's SDPA
// call runs) on fp32 copies, per block of batch rows so the additive mask stays small.
#include "checks.h"

#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace jepa_engine {
namespace {

constexpr const char* kOp = "masked_attention";
constexpr int64_t kMaxHeadDim = 256;

std::string fmt_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < c.numel(); ++i) s << (i ? ", " : "") << c.const_data_ptr<int64_t>()[i];
  s << "]";
  return s.str();
}

// The argument checks of the public `masked_attention` (kernels/masked_attention.py), in its order and
// with its messages, on the op's arguments (frame_len = frame_size + frame_extra_tokens, 0 = none).
void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& cu_seqlens,
                const std::optional<at::Tensor>& keep_index, int64_t frame_len, double scale) {
  const bool varlen = cu_seqlens.has_value();
  const std::initializer_list<c10::ScalarType> floats = {at::kFloat, at::kHalf, at::kBFloat16};
  check_tensor(kOp, "q", q, varlen ? 3 : 4, floats, std::nullopt);
  check_tensor(kOp, "k", k, q.dim(), floats, q.device());
  check_tensor(kOp, "v", v, q.dim(), floats, q.device());
  check_same_dtype(kOp, "k", k, "q", q);
  check_same_dtype(kOp, "v", v, "q", q);
  const int64_t D = q.size(-1);
  TORCH_CHECK_VALUE(1 <= D && D <= kMaxHeadDim, kOp, ": head dim (last dim of q) must be in [1, ", kMaxHeadDim,
                    "], got ", D);
  int64_t B = 0, N_q = 0, N_k = 0, T = 0;
  if (varlen) {
    T = q.size(0);
    const int64_t H = q.size(1);
    check_shape(kOp, "k", k, {T, H, D}, "[T, H, D]");
    check_shape(kOp, "v", v, {T, H, D}, "[T, H, D]");
    check_tensor(kOp, "cu_seqlens", *cu_seqlens, 1, {at::kInt}, q.device());
    TORCH_CHECK_VALUE(cu_seqlens->numel() >= 2, kOp, ": cu_seqlens must be [B + 1] with B >= 1, got [",
                      cu_seqlens->numel(), "]");
    TORCH_CHECK_VALUE(!key_padding && !keep_index, kOp, ": cu_seqlens cannot be combined with key_padding or "
                      "keep_index (pack only the visible tokens instead)");
    N_k = T;
  } else {
    B = q.size(0), N_q = q.size(2), N_k = k.size(2);
    const int64_t H = q.size(1);
    check_shape(kOp, "k", k, {B, H, N_k, D}, "[B, H, N_k, D] with q's B, H, D");
    check_shape(kOp, "v", v, {B, H, N_k, D}, "[B, H, N_k, D] like k");
  }
  if (key_padding) {
    check_tensor(kOp, "key_padding", *key_padding, 2, {at::kBool}, q.device());
    check_shape(kOp, "key_padding", *key_padding, {B, N_k}, "[B, N_k]");
  }
  TORCH_CHECK_VALUE(frame_len >= 0, kOp, ": frame_len (frame_size + frame_extra_tokens) must be >= 0, got ",
                    frame_len);
  if (frame_len > 0) {
    TORCH_CHECK_VALUE(varlen || N_q == N_k, kOp, ": frame-causal attention needs N_q == N_k (self-attention), got ",
                      N_q, " and ", N_k);
    TORCH_CHECK_VALUE(!keep_index, kOp, ": frame_size cannot be combined with keep_index");
  }
  if (keep_index) {
    check_tensor(kOp, "keep_index", *keep_index, 2, {at::kInt, at::kLong}, q.device());
    TORCH_CHECK_VALUE(!key_padding, kOp, ": keep_index cannot be combined with key_padding (mark unused slots "
                      "with -1)");
    TORCH_CHECK_VALUE(keep_index->size(0) == B, kOp, ": keep_index must be [B, K] = [", B, ", K], got ",
                      fmt_shape(keep_index->sizes()));
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, ": scale must be finite, got ", py_float(scale));
  // The checks that read values (_check_values).
  if (varlen) {
    const at::Tensor c = cu_seqlens->to(at::kLong).contiguous();
    const int64_t* p = c.const_data_ptr<int64_t>();
    bool decreasing = false;
    for (int64_t i = 1; i < c.numel(); ++i) decreasing |= p[i] < p[i - 1];
    TORCH_CHECK_VALUE(p[0] == 0 && p[c.numel() - 1] == T && !decreasing, kOp, ": cu_seqlens must start at 0, be "
                      "non-decreasing and end at the token total ", T, ", got ", fmt_values(c));
  }
  if (keep_index) {
    const at::Tensor srt = std::get<0>(keep_index->to(at::kLong).sort(1));
    const int64_t lo = srt.min().item<int64_t>(), hi = srt.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < N_k, kOp, ": keep_index values must be in [-1, N_k) = [-1, ", N_k,
                      ") (-1 = unused slot), got min ", lo, ", max ", hi);
    const int64_t K = srt.size(1);
    if (K > 1) {
      const at::Tensor a = srt.narrow(1, 1, K - 1), b = srt.narrow(1, 0, K - 1);
      const at::Tensor dup = a.eq(b).logical_and_(a.ge(0)).any(1);
      if (dup.any().item<bool>()) {
        const int64_t row = dup.nonzero().min().item<int64_t>();
        TORCH_CHECK_VALUE(false, kOp, ": keep_index must not repeat a key position within a sample (sample ", row,
                          " does); duplicates would double-count that key");
      }
    }
  }
}

// Softmax attention of one block: q [b, H, n_q, D], k / v [b, H, n_k, D] (fp32), allowed [b, n_q, n_k]
// bool or undefined (every key). Writes out ([b, H, n_q, D], any dtype) and lse ([b, H, n_q] fp32, base 2).
// ATen's fused CPU attention (the kernel SDPA runs, as the reference does) with an additive mask; a row
// with no allowed key attends to every key there and is then zeroed, its lse set to +inf.
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed, double scale,
            at::Tensor out, at::Tensor lse) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  std::optional<at::Tensor> bias;
  at::Tensor visible;
  if (allowed.defined()) {
    visible = allowed.any(-1, /*keepdim=*/true);                                  // [b, n_q, 1]
    const at::Tensor hidden = allowed.logical_or(visible.logical_not()).logical_not_();
    bias = at::zeros(allowed.sizes(), q.options()).masked_fill_(hidden, -inf).unsqueeze(1);
  }
  auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, bias, scale);
  l.div_(std::log(2.0));
  if (visible.defined()) {
    o.mul_(visible.unsqueeze(1));
    l.masked_fill_(visible.logical_not().squeeze(-1).unsqueeze(1), inf);
  }
  out.copy_(o);
  lse.copy_(l);
}

// The boolean mask [b, n_q, n_k] of the non-varlen kinds for batch rows [b0, b0 + b) (attention_mask).
at::Tensor allowed_keys(int64_t b0, int64_t b, int64_t n_q, int64_t n_k, const std::optional<at::Tensor>& key_padding,
                        int64_t frame_len, const std::optional<at::Tensor>& keep_index, const at::TensorOptions& opts) {
  if (!key_padding && frame_len == 0 && !keep_index) return at::Tensor();
  at::Tensor mask = at::ones({b, n_q, n_k}, opts.dtype(at::kBool));
  if (key_padding) mask.logical_and_(key_padding->narrow(0, b0, b).unsqueeze(1));
  if (frame_len > 0) {
    const at::Tensor fq = at::arange(n_q, opts.dtype(at::kLong)).div_(frame_len, "floor");
    const at::Tensor fk = at::arange(n_k, opts.dtype(at::kLong)).div_(frame_len, "floor");
    mask.logical_and_(fk.view({1, 1, n_k}).le(fq.view({1, n_q, 1})));
  }
  if (keep_index) {
    const at::Tensor idx = keep_index->narrow(0, b0, b).to(at::kLong);
    at::Tensor sel = at::zeros({b, n_k + 1}, opts.dtype(at::kBool));
    sel.scatter_(1, at::where(idx.lt(0), n_k, idx), true);   // unused slots land in a spare column
    mask.logical_and_(sel.narrow(1, 0, n_k).unsqueeze(1));
  }
  return mask;
}

std::tuple<at::Tensor, at::Tensor> masked_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& key_padding,
                                                        const std::optional<at::Tensor>& cu_seqlens,
                                                        const std::optional<at::Tensor>& keep_index, int64_t frame_len,
                                                        double scale, int64_t /*max_seqlen*/) {
  check_args(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale);
  const auto f32 = q.options().dtype(at::kFloat);
  if (cu_seqlens) {
    const int64_t T = q.size(0), H = q.size(1);
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({H, T}, f32);
    const at::Tensor c = cu_seqlens->to(at::kLong).contiguous();
    const int64_t* cu = c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i + 1 < c.numel(); ++i) {
      const int64_t s0 = cu[i], n = cu[i + 1] - cu[i];
      if (n == 0) continue;
      auto seq = [&](const at::Tensor& x) { return x.narrow(0, s0, n).transpose(0, 1).unsqueeze(0).to(at::kFloat); };
      const at::Tensor allowed = allowed_keys(0, 1, n, n, std::nullopt, frame_len, std::nullopt, q.options());
      attend(seq(q), seq(k), seq(v), allowed, scale, out.narrow(0, s0, n).transpose(0, 1).unsqueeze(0),
             lse.narrow(1, s0, n).unsqueeze(0));
    }
    return {out, lse};
  }
  const int64_t B = q.size(0), H = q.size(1), N_q = q.size(2), D = q.size(3), N_k = k.size(2);
  at::Tensor out = at::empty({B, N_q, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, N_q}, f32);
  // Batch blocks of about 4M scores: the score buffer stays small, each GEMM stays large.
  const int64_t per = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, H * N_q * N_k));
  for (int64_t b0 = 0; b0 < B; b0 += per) {
    const int64_t b = std::min(per, B - b0);
    const at::Tensor allowed = allowed_keys(b0, b, N_q, N_k, key_padding, frame_len, keep_index, q.options());
    auto blk = [&](const at::Tensor& x) { return x.narrow(0, b0, b).to(at::kFloat); };
    attend(blk(q), blk(k), blk(v), allowed, scale, out.narrow(0, b0, b), lse.narrow(0, b0, b));
  }
  return {out, lse};
}

}  // namespace
}  // namespace jepa_engine

TORCH_LIBRARY_FRAGMENT(jepa_engine, m) {
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding, Tensor? cu_seqlens, Tensor? keep_index, "
        "SymInt frame_len, float scale, SymInt max_seqlen) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jepa_engine, CPU, m) {
  m.impl("masked_attention", &jepa_engine::masked_attention_cpu);
}
