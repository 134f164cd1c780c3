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

// Python's repr() of a float, exactly: the shortest digits that round-trip, in positional notation when
// the decimal exponent is in [-4, 16), else as d.ddde+XX ("0.0001", "1e-05", "1e+16", "-2.5", "nan").
inline std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string sci(buf, r.ptr);                       // "-d.ddde+XX"
  const size_t e = sci.find('e');
  const bool neg = sci[0] == '-';
  std::string digits;
  for (size_t i = neg ? 1 : 0; i < e; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  const int exp10 = std::stoi(sci.substr(e + 1));
  const int decpt = exp10 + 1;                             // value = 0.digits * 10^decpt
  const int n = static_cast<int>(digits.size());
  std::string out = neg ? "-" : "";
  if (decpt <= -4 || decpt > 16) {
    out += digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    const int a = std::abs(exp10);
    out += std::string(exp10 < 0 ? "e-" : "e+") + (a < 10 ? "0" : "") + std::to_string(a);
  } else if (decpt <= 0) {
    out += "0." + std::string(-decpt, '0') + digits;
  } else if (decpt >= n) {
    out += digits + std::string(decpt - n, '0') + ".0";
  } else {
    out += digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  return out;
}

// Python's repr() of a str: single quotes unless the text has one and no double quote; backslash, the
// quote, \t \n \r and the other ASCII control characters escaped. Bytes >= 0x80 (UTF-8) are kept as they
// are, which is Python's repr for printable non-ASCII characters.
inline std::string py_str(c10::string_view s) {
  const bool dq = s.find('\'') != c10::string_view::npos && s.find('"') == c10::string_view::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\\' || c == q) {
      out += '\\';
      out += c;
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (u < 0x20 || u == 0x7f) {
      const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  return out + q;
}

// The checks of _launch.check_tensor after the rank: dtype, device, non-empty, in that order.
inline void check_dtype_device(const char* op, const char* name, const at::Tensor& t,
                               std::initializer_list<c10::ScalarType> dtypes, const c10::optional<c10::Device>& device,
                               bool nonempty) {
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

inline void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t ndim,
                         std::initializer_list<c10::ScalarType> dtypes, const c10::optional<c10::Device>& device,
                         bool nonempty = true) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got ", t.dim(), "-D with shape ",
                    fmt_shape(t.sizes()));
  check_dtype_device(op, name, t, dtypes, device, nonempty);
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
