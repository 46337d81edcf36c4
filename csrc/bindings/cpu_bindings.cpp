// Python bindings of the CPU extension. Kernels live in csrc/cpu and take raw pointers; this file
// validates arguments (errors name the argument: ValueError / TypeError as docs/design.md asks) and
// hands strided views to the kernels, which read non-contiguous and 16-bit inputs directly: no
// input is copied or converted up front.
#include <torch/extension.h>

#include "bindings/checks.h"

#include <cmath>
#include <cstring>
#include <tuple>
#include <optional>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/line_cells.h"
#include "cpu/linear_int8.h"
#include "cpu/nearest.h"
#include "cpu/quantize_rows.h"

namespace {

using raad::CpuIsa;
namespace rc = raad::cpu;

std::string avx512_status() {
  const CpuIsa best = raad::best_isa();
  if (static_cast<int>(best) < static_cast<int>(CpuIsa::Avx512Vnni)) return "not available on this CPU";
  const std::string err = rc::self_check(CpuIsa::Avx512Vnni);
  return err.empty() ? "self-check passed" : "self-check FAILED, using avx2: " + err;
}

bool amx_linear_active();
std::string linear_gemm_for(int64_t K, const std::optional<std::string>& gemm);

py::dict capabilities() {
  const auto& f = raad::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2 && f.fma && f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vnni"] = f.avx512vnni;
  d["avx512bf16"] = f.avx512bf16;
  d["amx_int8"] = f.amx_int8;
  d["amx_bf16"] = f.amx_bf16;
  d["active_isa"] = raad::isa_name(raad::active_isa());
  d["best_isa"] = raad::isa_name(raad::best_isa());
  d["kernel_isa"] = raad::isa_name(rc::kernel_isa(raad::active_isa()));
  // the W8A8 linear's integer GEMM: AMX tiles, oneDNN's _int_mm (VNNI), or exact fp32 on codes
  d["linear_gemm"] = linear_gemm_for(0, std::nullopt);
  return d;
}

CpuIsa parse_isa(const std::optional<std::string>& isa) {
  if (!isa.has_value()) return raad::active_isa();  // honours RAAD_CPU_ISA
  CpuIsa want;
  if (*isa == "portable") want = CpuIsa::Portable;
  else if (*isa == "avx2") want = CpuIsa::Avx2;
  else if (*isa == "avx512") want = CpuIsa::Avx512Vnni;
  else if (*isa == "amx") want = CpuIsa::Amx;
  else RAAD_CHECK_VALUE(false, "isa must be None or one of 'portable', 'avx2', 'avx512', 'amx'; got '", *isa, "'");
  const CpuIsa best = raad::best_isa();
  RAAD_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "isa='", *isa,
                    "' is not supported by this CPU (best available: '", raad::isa_name(best), "')");
  return want;
}

rc::DType dtype_of(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat: return rc::DType::F32;
    case torch::kHalf: return rc::DType::F16;
    case torch::kBFloat16: return rc::DType::BF16;
    default: RAAD_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(), "; allowed: float32, float16, bfloat16");
  }
  return rc::DType::F32;
}

rc::View4 view_of(const torch::Tensor& t, rc::DType dt) {
  rc::View4 v;
  v.data = t.data_ptr();
  v.dtype = dt;
  for (int i = 0; i < 4; ++i) v.stride[i] = t.size(i) == 1 ? 0 : t.stride(i);
  return v;
}

struct Checked {
  rc::AttentionArgs args;
  torch::Tensor mask;  // keeps the expanded view alive
};

Checked check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t qk_bits,
                     int64_t pv_bits, std::optional<double> scale, const std::optional<torch::Tensor>& attn_mask,
                     bool smooth_k, std::optional<bool> rotate) {
  const char* names[3] = {"q", "k", "v"};
  const torch::Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    RAAD_CHECK_TYPE(ts[i]->defined(), names[i], " must be a tensor");
    RAAD_CHECK_VALUE(ts[i]->device().is_cpu(), names[i], " must be on the CPU for the cpu backend, got ",
                      ts[i]->device());
    RAAD_CHECK_VALUE(ts[i]->dim() == 4, names[i], " must be 4-D (B, H, N, D) like SDPA, got shape ",
                      ts[i]->sizes());
    dtype_of(*ts[i], names[i]);
  }
  RAAD_CHECK_TYPE(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
                   "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  RAAD_CHECK_VALUE(q.size(0) == k.size(0) && q.size(0) == v.size(0) && q.size(1) == k.size(1) && q.size(1) == v.size(1),
                    "q, k, v must share batch and head dims (B, H), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  RAAD_CHECK_VALUE(q.size(3) == k.size(3), "q and k must share the head dim D, got ", q.size(3), " and ", k.size(3));
  RAAD_CHECK_VALUE(k.size(2) == v.size(2), "k and v must have the same number of tokens, got ", k.size(2), " and ",
                    v.size(2));
  RAAD_CHECK_VALUE(q.size(2) >= 1, "q needs at least one token (N >= 1), got N = ", q.size(2));
  RAAD_CHECK_VALUE(k.size(2) >= 1, "k needs at least one token (N >= 1), got N = ", k.size(2));
  RAAD_CHECK_VALUE(q.size(3) >= 1 && v.size(3) >= 1, "head dims must be >= 1, got D = ", q.size(3), ", Dv = ",
                    v.size(3));
  RAAD_CHECK_VALUE(q.size(3) <= 4096 && v.size(3) <= 4096, "head dims above 4096 are not supported by the cpu "
                    "backend, got D = ", q.size(3), ", Dv = ", v.size(3));
  RAAD_CHECK_VALUE(q.size(0) >= 1 && q.size(1) >= 1, "B and H must be >= 1, got ", q.sizes());
  RAAD_CHECK_VALUE(qk_bits == 2 || qk_bits == 4 || qk_bits == 8, "qk_bits must be one of (2, 4, 8), got ", qk_bits);
  RAAD_CHECK_VALUE(pv_bits == 8 || pv_bits == 16, "pv_bits must be one of (8, 16), got ", pv_bits);

  Checked c;
  rc::AttentionArgs& a = c.args;
  a.B = q.size(0); a.H = q.size(1); a.Nq = q.size(2); a.Nk = k.size(2); a.D = q.size(3); a.Dv = v.size(3);
  const rc::DType dt = dtype_of(q, "q");
  a.q = view_of(q, dt);
  a.k = view_of(k, dt);
  a.v = view_of(v, dt);
  a.qk_bits = int(qk_bits);
  a.pv_bits = int(pv_bits);
  if (scale.has_value()) {
    RAAD_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, "scale must be a positive finite number, got ", *scale);
    a.scale = float(*scale);
  } else {
    a.scale = float(1.0 / std::sqrt(double(a.D)));
  }
  a.smooth_k = smooth_k;
  a.rotate = rotate.has_value() ? *rotate : qk_bits < 8;
  if (attn_mask.has_value() && attn_mask->defined()) {
    const torch::Tensor& m = *attn_mask;
    RAAD_CHECK_VALUE(m.device().is_cpu(), "attn_mask is on ", m.device(), ", q on cpu");
    RAAD_CHECK_TYPE(m.scalar_type() == torch::kBool || m.scalar_type() == torch::kFloat ||
                         m.scalar_type() == torch::kHalf || m.scalar_type() == torch::kBFloat16,
                     "attn_mask must be bool (True = attend) or a float additive mask, got ", m.scalar_type());
    RAAD_CHECK_VALUE(m.dim() <= 4, "attn_mask must have at most 4 dims, got ", m.dim());
    torch::Tensor e;
    try {
      e = m.expand({a.B, a.H, a.Nq, a.Nk});
    } catch (const c10::Error&) {
      RAAD_CHECK_VALUE(false, "attn_mask of shape ", m.sizes(), " does not broadcast to (B, H, Nq, Nk) = (", a.B,
                        ", ", a.H, ", ", a.Nq, ", ", a.Nk, ")");
    }
    c.mask = e;
    a.mask = view_of(e, m.scalar_type() == torch::kBool ? rc::DType::Bool : dtype_of(m, "attn_mask"));
  }
  return c;
}

py::tuple attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t qk_bits,
                    int64_t pv_bits, std::optional<double> scale, std::optional<torch::Tensor> attn_mask,
                    bool smooth_k, std::optional<bool> rotate, const std::vector<std::string>& return_maps,
                    std::optional<torch::Tensor> out, std::optional<std::string> isa) {
  Checked c = check_inputs(q, k, v, qk_bits, pv_bits, scale, attn_mask, smooth_k, rotate);
  rc::AttentionArgs& a = c.args;
  const CpuIsa path = parse_isa(isa);

  bool want[3] = {false, false, false};
  const char* map_names[3] = {"cls", "received", "entropy"};
  for (const auto& n : return_maps) {
    int idx = -1;
    for (int i = 0; i < 3; ++i)
      if (n == map_names[i]) idx = i;
    RAAD_CHECK_VALUE(idx >= 0, "return_maps: unknown map '", n, "'; allowed: ('cls', 'received', 'entropy')");
    RAAD_CHECK_VALUE(!want[idx], "return_maps lists the map '", n, "' twice");
    want[idx] = true;
  }

  torch::Tensor o;
  if (out.has_value() && out->defined()) {
    o = *out;
    RAAD_CHECK_VALUE(o.device().is_cpu(), "out must be on the CPU, got ", o.device());
    RAAD_CHECK_TYPE(o.scalar_type() == q.scalar_type(), "out must have the dtype of q (", q.scalar_type(), "), got ",
                     o.scalar_type());
    RAAD_CHECK_VALUE(o.sizes() == torch::IntArrayRef({a.B, a.H, a.Nq, a.Dv}), "out must have shape (B, H, Nq, Dv) = (",
                      a.B, ", ", a.H, ", ", a.Nq, ", ", a.Dv, "), got ", o.sizes());
    RAAD_CHECK_VALUE(o.stride(3) == 1 || a.Dv == 1, "out's channels (last dim) must be contiguous, got strides ",
                     o.strides());
  } else {
    o = torch::empty({a.B, a.H, a.Nq, a.Dv}, q.options());
  }
  a.out = o.data_ptr();
  for (int d = 0; d < 3; ++d) a.out_stride[d] = o.stride(d);

  const auto f32 = q.options().dtype(torch::kFloat);
  torch::Tensor cls, rec, ent;
  if (want[0]) { cls = torch::empty({a.B, a.H, a.Nk}, f32); a.cls = cls.data_ptr<float>(); }
  if (want[1]) { rec = torch::empty({a.B, a.H, a.Nk}, f32); a.received = rec.data_ptr<float>(); }
  if (want[2]) { ent = torch::empty({a.B, a.H, a.Nq}, f32); a.entropy = ent.data_ptr<float>(); }
  a.num_threads = std::max(1, at::get_num_threads());

  {
    py::gil_scoped_release release;
    rc::attention(a, path);
  }

  py::dict maps;
  for (const auto& n : return_maps) {
    if (n == "cls") maps["cls"] = cls;
    else if (n == "received") maps["received"] = rec;
    else maps["entropy"] = ent;
  }
  return py::make_tuple(o, maps);
}

py::tuple quantize_qk_debug(const torch::Tensor& q, const torch::Tensor& k, int64_t qk_bits, bool smooth_k,
                            std::optional<bool> rotate, std::optional<std::string> isa) {
  Checked c = check_inputs(q, k, k, qk_bits, 16, std::nullopt, std::nullopt, smooth_k, rotate);
  rc::AttentionArgs& a = c.args;
  const int64_t dp = rc::padded_head_dim(a.D, a.rotate);
  auto i8 = q.options().dtype(torch::kInt8);
  auto f32 = q.options().dtype(torch::kFloat);
  torch::Tensor qc = torch::empty({a.B, a.H, a.Nq, dp}, i8), qs = torch::empty({a.B, a.H, a.Nq}, f32);
  torch::Tensor kc = torch::empty({a.B, a.H, a.Nk, dp}, i8), ks = torch::empty({a.B, a.H, a.Nk}, f32);
  rc::quantize_qk_debug(a, parse_isa(isa), qc.data_ptr<int8_t>(), qs.data_ptr<float>(), kc.data_ptr<int8_t>(),
                        ks.data_ptr<float>());
  return py::make_tuple(qc, qs, kc, ks);
}

std::string self_check(const std::string& isa) { return rc::self_check(parse_isa(isa)); }

// The kernels' Q/K row quantizer on its own (raad_kernels.fake_quant's scale search).
py::tuple quantize_rows(const torch::Tensor& x, int64_t bits, std::optional<std::string> isa) {
  RAAD_CHECK_VALUE(x.device().is_cpu(), "quantize_rows takes a CPU tensor, got x on ", x.device());
  RAAD_CHECK_TYPE(x.scalar_type() == torch::kFloat, "quantize_rows: x must be float32, got ", x.scalar_type());
  RAAD_CHECK_VALUE(x.dim() == 2, "quantize_rows: x must be 2-D (rows, n), got shape ", x.sizes());
  RAAD_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, "quantize_rows: bits must be 8, 4 or 2, got ", bits);
  const torch::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), n = xc.size(1);
  RAAD_CHECK_VALUE(n >= 1 && n <= (int64_t{1} << 20), "quantize_rows: rows of 1 to 2^20 values, got ", n);
  torch::Tensor codes = torch::empty({rows, n}, xc.options().dtype(torch::kInt8));
  torch::Tensor scale = torch::empty({rows}, xc.options());
  {
    py::gil_scoped_release nogil;
    rc::quantize_rows(xc.data_ptr<float>(), rows, n, int(bits), codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
                      std::max(1, at::get_num_threads()), parse_isa(isa));
  }
  return py::make_tuple(codes, scale);
}

// W8A8 linear (raad_kernels.linear.int8_linear): activations quantized per row in one pass,
// torch's integer GEMM (oneDNN, VNNI where the CPU has it), scales and bias in one pass.
// the largest K for which an fp32 GEMM of int8 codes in [-127, 127] is exact (127^2 K < 2^24)
constexpr int64_t kExactFloatK = (int64_t{1} << 24) / (127 * 127);

// Whether linear_int8 runs its GEMM on AMX tiles: the running ISA is AMX (RAAD_CPU_ISA can cap
// it) and, once per process, the tile kernel matched exact integer sums on ragged shapes (a
// kernel that is wrong on some CPU or OS must not silently replace a correct one).
bool amx_linear_checked() {
  static const bool ok = [] {
    uint32_t state = 12345u;
    auto next = [&state] {
      state = state * 1664525u + 1013904223u;
      return int8_t(int((state >> 24) % 255) - 127);
    };
    for (auto [M, K, N] : {std::tuple<int64_t, int64_t, int64_t>{37, 100, 50}, {64, 128, 64}, {5, 2, 3}}) {
      std::vector<int8_t> a(M * K), w(K * N), packed(rc::amx_packed_weight_bytes(K, N));
      for (auto& v : a) v = next();
      for (auto& v : w) v = next();
      std::vector<float> sx(M), sw(N), bias(N), y(M * N, std::nanf("")), ref(M * N);
      for (int64_t r = 0; r < M; ++r) sx[r] = 0.01f * float(r + 1);
      for (int64_t o = 0; o < N; ++o) sw[o] = 0.003f * float(o + 2), bias[o] = 0.5f - 0.01f * float(o);
      std::vector<int32_t> acc(M * N);
      for (int64_t r = 0; r < M; ++r)
        for (int64_t o = 0; o < N; ++o) {
          int32_t t = 0;
          for (int64_t k = 0; k < K; ++k) t += int32_t(a[r * K + k]) * int32_t(w[k * N + o]);
          acc[r * N + o] = t;
        }
      rc::dequantize_i32(acc.data(), M, N, sx.data(), sw.data(), bias.data(), ref.data(), 1);
      rc::amx_pack_weight(w.data(), K, N, N, 1, packed.data());
      rc::amx_linear_i8(a.data(), M, K, packed.data(), N, sx.data(), sw.data(), bias.data(), y.data(), 2);
      if (std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)) != 0) return false;
    }
    return true;
  }();
  return ok;
}

bool amx_linear_active() { return raad::active_isa() == CpuIsa::Amx && amx_linear_checked(); }

// The integer GEMM linear_int8 runs: AMX tiles where they are active and checked; oneDNN's
// _int_mm where the CPU has VNNI (or rows are too long for exact fp32); else an fp32 GEMM of the
// codes. `gemm` names one explicitly (tests compare the paths bit for bit).
std::string linear_gemm_for(int64_t K, const std::optional<std::string>& gemm) {
  if (!gemm.has_value()) {
    if (amx_linear_active()) return "amx";
    const bool int_gemm_pays = static_cast<int>(raad::best_isa()) >= static_cast<int>(CpuIsa::Avx512Vnni);
    return int_gemm_pays || K > kExactFloatK ? "int_mm" : "fp32";
  }
  RAAD_CHECK_VALUE(*gemm == "amx" || *gemm == "int_mm" || *gemm == "fp32",
                   "gemm must be None, 'amx', 'int_mm' or 'fp32'; got '", *gemm, "'");
  RAAD_CHECK_VALUE(*gemm != "amx" || amx_linear_active(), "gemm='amx' needs AMX-INT8 as the active ISA (active: '",
                   raad::isa_name(raad::active_isa()), "') and its self-check passed");
  RAAD_CHECK_VALUE(*gemm != "fp32" || K <= kExactFloatK, "gemm='fp32' is exact only for in_features <= ",
                   kExactFloatK, "; got ", K);
  return *gemm;
}

torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& w_codes_t, const torch::Tensor& w_scale,
                          const std::optional<torch::Tensor>& bias, const std::optional<std::string>& gemm) {
  RAAD_CHECK_TYPE(x.scalar_type() == torch::kFloat, "x must be float32, got ", x.scalar_type());
  RAAD_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D (tokens, features) tensor");
  RAAD_CHECK_TYPE(w_codes_t.scalar_type() == torch::kChar, "w_codes_t must be int8, got ", w_codes_t.scalar_type());
  RAAD_CHECK_VALUE(w_codes_t.dim() == 2 && w_codes_t.size(0) == x.size(1), "w_codes_t must be (", x.size(1),
                   ", out_features), got ", w_codes_t.sizes());
  RAAD_CHECK_VALUE(x.size(1) > 1, "in_features must be > 1 (torch's CPU _int_mm is wrong for K = 1)");
  const int64_t M = x.size(0), K = x.size(1), N = w_codes_t.size(1);
  RAAD_CHECK_VALUE(w_scale.scalar_type() == torch::kFloat && w_scale.dim() == 1 && w_scale.size(0) == N &&
                       w_scale.is_contiguous(), "w_scale must be a contiguous float32 (", N, ",) tensor");
  const float* b = nullptr;
  if (bias.has_value()) {
    RAAD_CHECK_VALUE(bias->scalar_type() == torch::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                         bias->is_contiguous(), "bias must be a contiguous float32 (", N, ",) tensor");
    b = bias->data_ptr<float>();
  }
  for (const auto* t : {&x, &w_codes_t, &w_scale})
    RAAD_CHECK_VALUE(t->device().is_cpu(), "linear_int8 takes CPU tensors");
  const std::string path = linear_gemm_for(K, gemm);
  const int threads = at::get_num_threads();
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto sx = torch::empty({M}, x.options());
  rc::quantize_rows_i8(x.data_ptr<float>(), M, K, K, codes.data_ptr<int8_t>(), sx.data_ptr<float>(), threads);
  if (path == "amx") {
    // the weight is re-laid out per call (K·N bytes, small next to the M·K·N products)
    auto packed = torch::empty({rc::amx_packed_weight_bytes(K, N)}, x.options().dtype(torch::kChar));
    rc::amx_pack_weight(w_codes_t.data_ptr<int8_t>(), K, N, w_codes_t.stride(0), w_codes_t.stride(1),
                        packed.data_ptr<int8_t>());
    auto y = torch::empty({M, N}, x.options());
    rc::amx_linear_i8(codes.data_ptr<int8_t>(), M, K, packed.data_ptr<int8_t>(), N, sx.data_ptr<float>(),
                      w_scale.data_ptr<float>(), b, y.data_ptr<float>(), threads);
    return y;
  }
  // oneDNN's int8 GEMM is fast only with VNNI (or AMX); on AVX2 alone it took 30x an fp32 GEMM
  // (Zen 2, 2056x128x384: 60 ms vs 1.8). There the codes' product runs as an fp32 GEMM, which is
  // exact while every partial sum is an integer below 2^24: |sum| <= 127^2 K, K <= 1040.
  auto acc = path == "int_mm"
                 ? at::_int_mm(codes, w_codes_t)
                 : at::mm(codes.to(torch::kFloat), w_codes_t.to(torch::kFloat)).to(torch::kInt);
  auto y = torch::empty({M, N}, x.options());
  rc::dequantize_i32(acc.data_ptr<int32_t>(), M, N, sx.data_ptr<float>(), w_scale.data_ptr<float>(), b,
                     y.data_ptr<float>(), threads);
  return y;
}

torch::Tensor nearest_sq_distance(const torch::Tensor& q, const torch::Tensor& bank_t, const torch::Tensor& b_sq) {
  for (const auto* t : {&q, &bank_t, &b_sq}) {
    RAAD_CHECK_TYPE(t->scalar_type() == torch::kFloat, "nearest_sq_distance takes float32 tensors, got ",
                    t->scalar_type());
    RAAD_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(), "nearest_sq_distance takes contiguous CPU tensors");
  }
  RAAD_CHECK_VALUE(q.dim() == 2 && bank_t.dim() == 2 && bank_t.size(0) == q.size(1), "q must be (M, K) and bank_t (K, N); got ",
                   q.sizes(), " and ", bank_t.sizes());
  const int64_t n = bank_t.size(1);
  RAAD_CHECK_VALUE(n > 0 && n % rc::kNearestCols == 0, "bank_t's N must be a positive multiple of ",
                   rc::kNearestCols, " (pad with b_sq = inf), got ", n);
  RAAD_CHECK_VALUE(b_sq.dim() == 1 && b_sq.size(0) == n, "b_sq must be (", n, ",), got ", b_sq.sizes());
  RAAD_CHECK_VALUE(q.size(1) <= 512, "nearest_sq_distance takes at most 512 channels, got ", q.size(1));
  auto out = torch::empty({q.size(0)}, q.options());
  rc::nearest_sq_f32(q.data_ptr<float>(), q.size(0), q.size(1), bank_t.data_ptr<float>(), b_sq.data_ptr<float>(), n,
                     out.data_ptr<float>(), at::get_num_threads());
  return out;
}

torch::Tensor nearest_sq_distance_i8(const torch::Tensor& q_u8, const torch::Tensor& s_q, const torch::Tensor& q_sq,
                                     const torch::Tensor& bank_packed, const torch::Tensor& col128,
                                     const torch::Tensor& b_sq, double s_b) {
  RAAD_CHECK_VALUE(raad::cpu_features().avx512vnni, "nearest_sq_distance_i8 needs AVX-512 VNNI, which this CPU lacks");
  RAAD_CHECK_TYPE(q_u8.scalar_type() == torch::kByte && bank_packed.scalar_type() == torch::kChar &&
                      col128.scalar_type() == torch::kInt && s_q.scalar_type() == torch::kFloat &&
                      q_sq.scalar_type() == torch::kFloat && b_sq.scalar_type() == torch::kFloat,
                  "nearest_sq_distance_i8: q_u8 uint8, bank_packed int8, col128 int32, s_q / q_sq / b_sq float32");
  for (const auto* t : {&q_u8, &s_q, &q_sq, &bank_packed, &col128, &b_sq})
    RAAD_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(), "nearest_sq_distance_i8 takes contiguous CPU tensors");
  const int64_t m = q_u8.size(0), k = q_u8.size(1), n = b_sq.size(0);
  RAAD_CHECK_VALUE(q_u8.dim() == 2 && k % 4 == 0, "q_u8 must be (M, K) with K a multiple of 4, got ", q_u8.sizes());
  RAAD_CHECK_VALUE(n > 0 && n % rc::kNearestCols == 0 && col128.numel() == n && bank_packed.numel() == n * k,
                   "the bank must hold N x K codes with N a positive multiple of ", rc::kNearestCols,
                   " (col128 and b_sq N long), got N=", n, ", codes ", bank_packed.numel());
  RAAD_CHECK_VALUE(s_q.numel() == m && q_sq.numel() == m, "s_q and q_sq must be (M,)");
  auto out = torch::empty({m}, s_q.options());
  rc::nearest_sq_i8_avx512vnni(q_u8.data_ptr<uint8_t>(), s_q.data_ptr<float>(), q_sq.data_ptr<float>(), m, k,
                               bank_packed.data_ptr<int8_t>(), col128.data_ptr<int32_t>(), b_sq.data_ptr<float>(),
                               static_cast<float>(s_b), n, out.data_ptr<float>(), at::get_num_threads());
  return out;
}

void line_cells(const torch::Tensor& grey, const torch::Tensor& taps_x, const torch::Tensor& taps_y,
                const torch::Tensor& steer, int64_t cell, int64_t pool, const torch::Tensor& out) {
  for (const auto* t : {&grey, &taps_x, &taps_y, &steer, &out}) {
    RAAD_CHECK_TYPE(t->scalar_type() == torch::kFloat, "line_cells takes float32 tensors, got ", t->scalar_type());
    RAAD_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(), "line_cells takes contiguous CPU tensors");
  }
  RAAD_CHECK_VALUE(grey.dim() == 3, "grey must be (B, H, W), got ", grey.sizes());
  const int64_t b = grey.size(0), h = grey.size(1), w = grey.size(2), k = taps_x.size(-1), o = steer.size(0);
  RAAD_CHECK_VALUE(taps_x.dim() == 2 && taps_x.size(0) == 3 && taps_y.sizes() == taps_x.sizes() && k % 2 == 1,
                   "taps_x and taps_y must be (3, K) with K odd, got ", taps_x.sizes(), " and ", taps_y.sizes());
  RAAD_CHECK_VALUE(steer.dim() == 2 && steer.size(1) == 3, "steer must be (O, 3), got ", steer.sizes());
  RAAD_CHECK_VALUE(cell >= 1 && pool >= 1 && pool % 2 == 1, "cell must be >= 1 and pool odd, got ", cell, " and ", pool);
  RAAD_CHECK_VALUE(h % cell == 0 && w % cell == 0 && h > k / 2 && w > k / 2, "H and W must be multiples of cell (",
                   cell, ") and larger than K / 2, got ", h, " x ", w);
  RAAD_CHECK_VALUE(out.dim() == 4 && out.size(0) == b && out.size(1) == o && out.size(2) == h / cell &&
                       out.size(3) == w / cell,
                   "out must be (", b, ", ", o, ", ", h / cell, ", ", w / cell, "), got ", out.sizes());
  rc::line_cells_f32(grey.data_ptr<float>(), b, h, w, taps_x.data_ptr<float>(), taps_y.data_ptr<float>(), k,
                     steer.data_ptr<float>(), o, cell, pool, out.data_ptr<float>(), at::get_num_threads());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "raad-kernels CPU extension";
  m.def("capabilities", &capabilities, "CPU features seen at run time and the ISA path in use");
  m.def("attention", &attention,
        "Fused quantized attention (see raad_kernels.cpu_backend). Returns (out, maps). `isa` forces a "
        "kernel path ('portable', 'avx2', 'avx512', 'amx'); default: raad active ISA (RAAD_CPU_ISA "
        "honoured). `out`: optional preallocated output of q's dtype, any strides with contiguous "
        "channels (e.g. (B, Nq, H, Dv) memory seen as (B, H, Nq, Dv)).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("qk_bits") = 8, py::arg("pv_bits") = 8,
        py::arg("scale") = py::none(), py::arg("attn_mask") = py::none(), py::arg("smooth_k") = true,
        py::arg("rotate") = py::none(), py::arg("return_maps") = std::vector<std::string>{},
        py::arg("out") = py::none(), py::arg("isa") = py::none());
  m.def("quantize_qk_debug", &quantize_qk_debug,
        "Test hook: the kernels' Q/K codes and scales, decoded from their packed layout",
        py::arg("q"), py::arg("k"), py::arg("qk_bits") = 8, py::arg("smooth_k") = true, py::arg("rotate") = py::none(),
        py::arg("isa") = py::none());
  m.def("quantize_rows", &quantize_rows,
        "Per-row codes and scales of float32 rows (rows, n) at qk_bits 8/4/2, as the attention kernels "
        "quantize Q and K (raad_kernels.quant.token_scales and quantize); -> (codes int8, scales float32)",
        py::arg("x"), py::arg("bits"), py::arg("isa") = py::none());
  m.def("self_check", &self_check, "Compare an ISA path with the portable one on small problems ('' = agree)",
        py::arg("isa"));
  m.def("linear_int8", &linear_int8, "W8A8 linear: x float32 (M, K) contiguous, w_codes_t int8 (K, N), "
        "w_scale float32 (N,), bias float32 (N,) or None -> float32 (M, N); gemm: None (best) or "
        "'amx' / 'int_mm' / 'fp32' (see raad_kernels.linear)",
        py::arg("x"), py::arg("w_codes_t"), py::arg("w_scale"), py::arg("bias") = py::none(),
        py::arg("gemm") = py::none());
  m.def("nearest_sq_distance", &nearest_sq_distance, "Each row of q (M, K): squared distance to its nearest "
        "column of bank_t (K, N), N a multiple of 64, b_sq (N,) the columns' squared norms (inf: padding) "
        "(see raad_kernels.nearest)", py::arg("q"), py::arg("bank_t"), py::arg("b_sq"));
  m.def("nearest_sq_distance_i8", &nearest_sq_distance_i8, "The int8 search on AVX-512 VNNI (see "
        "raad_kernels.nearest.nearest_sq_distance_int8)", py::arg("q_u8"), py::arg("s_q"), py::arg("q_sq"),
        py::arg("bank_packed"), py::arg("col128"), py::arg("b_sq"), py::arg("s_b"));
  m.def("line_cells", &line_cells, "Line cells of grey (B, H, W) into out (B, O, H/cell, W/cell): see "
        "raad_kernels/lines.py", py::arg("grey"), py::arg("taps_x"), py::arg("taps_y"), py::arg("steer"),
        py::arg("cell"), py::arg("pool"), py::arg("out"));
  m.def("avx512_status", &avx512_status, "Whether the AVX-512 kernels are in use, and their self-check result");
}
