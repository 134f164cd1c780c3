// Argument checks mirroring kernels/_launch.py (check_tensor, check_shape): each raises the Python
// exception type of its Python twin (ValueError / TypeError) with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>

namespace jepa_engine {

inline std::string fmt_shape(c10::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

// torch's Python name of a dtype ("float32", not ATen's "Float").
inline const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kShort: return "int16";
    case c10::kChar: return "int8";
    case c10::kByte: return "uint8";
    case c10::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// Python's repr of a float for the common cases: "0.0", "-1.5", "1e-05".
inline std::string py_float(double v) {
  if (std::isfinite(v) && v == static_cast<double>(static_cast<int64_t>(v)) && std::abs(v) < 1e16) {
    std::ostringstream s;
    s << static_cast<int64_t>(v) << ".0";
    return (v == 0.0 && std::signbit(v)) ? "-0.0" : s.str();
  }
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

inline void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t ndim,
                         std::initializer_list<c10::ScalarType> dtypes, const c10::optional<c10::Device>& device,
                         bool nonempty = true) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got ", t.dim(), "-D with shape ",
                    fmt_shape(t.sizes()));
  bool ok = false;
  std::string want;
  for (auto d : dtypes) {
    ok |= t.scalar_type() == d;
    want += (want.empty() ? "" : ", ") + std::string(dtype_name(d));
  }
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must have dtype in (", want, "), got ", dtype_name(t.scalar_type()));
  if (device) {
    TORCH_CHECK_VALUE(t.device() == *device, op, ": ", name, " must be on ", device->str(),
                      " like the other inputs, got ", t.device().str());
  }
  TORCH_CHECK_VALUE(!nonempty || t.numel() > 0, op, ": ", name, " must not be empty, got shape ",
                    fmt_shape(t.sizes()));
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef expected,
                        const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must be ", what, (*what ? " = " : ""),
                    fmt_shape(expected), ", got ", fmt_shape(t.sizes()));
}

// check_same_dtype of kernels/_launch.py: "op: k must have the dtype of q (float16), got float32".
inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
                   dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

}  // namespace jepa_engine
