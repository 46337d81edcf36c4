// Python bindings of the CUDA extension (raad_kernels._cuda). Kernels live in csrc/cuda and see
// raw pointers only; this file owns the tensors: argument checks, workspace allocation on the
// current stream, the mask → additive bias conversion, and the order of the launches.
//
// Built with RAAD_EMU (tests/test_cuda_backend.py, RAAD_CUDA_EMU=1) the same file binds the
// host emulator of the kernels to CPU tensors, so this whole path runs without a GPU.
#include <torch/extension.h>

#include "bindings/checks.h"

#include <cmath>
#include <optional>
#include <tuple>

#ifndef RAAD_EMU
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers)
#endif

#include "cuda/raad_cuda.h"

namespace raad {
int cuda_device_count();
int cuda_kernel_binary_version();
}

namespace {

namespace rc = raad::cuda;
using OptTensor = std::optional<at::Tensor>;

#ifdef RAAD_EMU
constexpr const char* kMod = "raad_kernels._cuda (emulated)";
#else
constexpr const char* kMod = "raad_kernels._cuda";
#endif

#define RAAD_CUDA_OK(expr)                                                                    \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    RAAD_CHECK_RUNTIME(err_ == cudaSuccess, kMod, ": ", #expr, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

void check_device(const at::Tensor& t, const char* name) {
#ifdef RAAD_EMU
  RAAD_CHECK_VALUE(t.device().is_cpu(), kMod, ": ", name, " must be a CPU tensor in the emulator, got ",
                    t.device());
#else
  RAAD_CHECK_VALUE(t.is_cuda(), kMod, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
#endif
}

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return rc::kF32;
    case at::kHalf: return rc::kF16;
    case at::kBFloat16: return rc::kBF16;
    default:
      RAAD_CHECK_TYPE(false, kMod, ": ", name, " has dtype ", t.scalar_type(),
                       "; allowed: float32, float16, bfloat16");
  }
  return -1;
}

cudaStream_t current_stream() {
#ifdef RAAD_EMU
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

int next_pow2(int d) {
  int r = 1;
  while (r < d) r <<= 1;
  return r;
}

// Offsets of the intermediates inside one byte buffer, each 256-byte aligned.
struct Workspace {
  size_t size = 0;
  size_t take(int64_t bytes) {
    const size_t off = size;
    size += (static_cast<size_t>(bytes) + 255) / 256 * 256;
    return off;
  }
};

void check_4d(const at::Tensor& t, const char* name) {
  check_device(t, name);
  RAAD_CHECK_VALUE(t.dim() == 4, kMod, ": ", name, " must be 4-D (B, H, N, D), got shape ", t.sizes());
}

// ---------------------------------------------------------------------------------------------
// quantize(x, bits, rotate, smooth) → (packed codes [B, H, N, row_bytes], scales [B, H, N])
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t bits, bool rotate, bool smooth) {
  check_4d(x_in, "x");
  const int dt = dtype_code(x_in, "x");
  RAAD_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, kMod, ": bits must be one of (2, 4, 8), got ", bits);
  const int64_t b = x_in.size(0), h = x_in.size(1), n = x_in.size(2), d = x_in.size(3);
  RAAD_CHECK_VALUE(d >= 1 && d <= 256, kMod, ": head dim of x must be in [1, 256], got ", d);
  RAAD_CHECK_VALUE(n >= 1, kMod, ": x needs at least one token");
#ifndef RAAD_EMU
  c10::cuda::CUDAGuard guard(x_in.device());
#endif
  const at::Tensor x = x_in.contiguous();
  const int qdim = rotate ? next_pow2(static_cast<int>(d)) : static_cast<int>(d);
  const int hd = rc::head_bucket(qdim);
  const int rb = rc::row_bytes(static_cast<int>(bits), hd);
  const int64_t bh = b * h;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor codes = at::empty({b, h, n, rb}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({b, h, n}, f32);
  if (bh == 0) return {codes, scales};
  cudaStream_t st = current_stream();
  at::Tensor mean;
  if (smooth) {
    mean = at::empty({bh, d}, f32);
    RAAD_CUDA_OK(rc::channel_stats(x.data_ptr(), dt, bh, static_cast<int>(n), static_cast<int>(d),
                                   mean.data_ptr<float>(), nullptr, st));
  }
  const float rs = static_cast<float>(1.0 / std::sqrt(static_cast<double>(qdim)));
  RAAD_CUDA_OK(rc::quantize_rows(x.data_ptr(), dt, smooth ? mean.data_ptr<float>() : nullptr, bh,
                                 static_cast<int>(n), static_cast<int>(n), static_cast<int>(d), rotate, rs,
                                 static_cast<int>(bits), hd, codes.data_ptr<uint8_t>(),
                                 scales.data_ptr<float>(), st));
  return {codes, scales};
}

// ---------------------------------------------------------------------------------------------
// attention(...) → (out, cls?, received?, entropy?)
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor> attention(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t qk_bits,
    int64_t pv_bits, double scale, const OptTensor& attn_mask, bool smooth_k, bool rotate, bool want_cls,
    bool want_received, bool want_entropy, const OptTensor& out_opt) {
  check_4d(q_in, "q");
  check_4d(k_in, "k");
  check_4d(v_in, "v");
  const int dt = dtype_code(q_in, "q");
  RAAD_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
                   kMod, ": q, k, v must share a dtype, got ", q_in.scalar_type(), ", ", k_in.scalar_type(),
                   ", ", v_in.scalar_type());
  RAAD_CHECK_VALUE(k_in.device() == q_in.device() && v_in.device() == q_in.device(), kMod,
                    ": q, k, v must be on one device, got ", q_in.device(), ", ", k_in.device(), ", ",
                    v_in.device());
  RAAD_CHECK_VALUE(qk_bits == 2 || qk_bits == 4 || qk_bits == 8, kMod,
                    ": qk_bits must be one of (2, 4, 8), got ", qk_bits);
  RAAD_CHECK_VALUE(pv_bits == 8 || pv_bits == 16, kMod, ": pv_bits must be one of (8, 16), got ", pv_bits);
  RAAD_CHECK_VALUE(std::isfinite(scale) && scale > 0, kMod, ": scale must be positive and finite, got ", scale);
  const int64_t b = q_in.size(0), h = q_in.size(1), nq = q_in.size(2), d = q_in.size(3);
  const int64_t nk = k_in.size(2), dv = v_in.size(3);
  RAAD_CHECK_VALUE(k_in.size(0) == b && k_in.size(1) == h && v_in.size(0) == b && v_in.size(1) == h, kMod,
                    ": q, k, v must share (B, H), got ", q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  RAAD_CHECK_VALUE(k_in.size(3) == d, kMod, ": q and k must share the head dim, got ", d, " and ", k_in.size(3));
  RAAD_CHECK_VALUE(v_in.size(2) == nk, kMod, ": k and v must have the same number of tokens, got ", nk,
                    " and ", v_in.size(2));
  RAAD_CHECK_VALUE(nq >= 1 && nk >= 1, kMod, ": q and k need at least one token, got Nq=", nq, ", Nk=", nk);
  RAAD_CHECK_VALUE(d >= 1 && d <= 256, kMod, ": the cuda backend supports q/k head dims 1..256, got ", d);
  RAAD_CHECK_VALUE(dv >= 1 && dv <= 256, kMod, ": the cuda backend supports v head dims 1..256, got ", dv);
  RAAD_CHECK_VALUE(nq < (1LL << 30) && nk < (1LL << 30), kMod, ": sequence too long");
#ifndef RAAD_EMU
  c10::cuda::CUDAGuard guard(q_in.device());
#endif
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t bh = b * h;
  const int qdim = rotate ? next_pow2(static_cast<int>(d)) : static_cast<int>(d);
  const int hd = rc::head_bucket(std::max<int>(qdim, static_cast<int>(dv)));
  const int rb = rc::row_bytes(static_cast<int>(qk_bits), hd);
  const int nkp = static_cast<int>((nk + rc::kKeyPad - 1) / rc::kKeyPad * rc::kKeyPad);
  auto f32 = q.options().dtype(at::kFloat);
  auto u8 = q.options().dtype(at::kByte);

  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    check_device(out, "out");
    RAAD_CHECK_VALUE(out.device() == q.device(), kMod, ": out is on ", out.device(), ", q on ", q.device());
    RAAD_CHECK_TYPE(out.scalar_type() == q.scalar_type(), kMod, ": out must have q's dtype ", q.scalar_type(),
                     ", got ", out.scalar_type());
    RAAD_CHECK_VALUE(out.sizes() == at::IntArrayRef({b, h, nq, dv}), kMod, ": out must have shape (",
                      b, ", ", h, ", ", nq, ", ", dv, "), got ", out.sizes());
    RAAD_CHECK_VALUE(out.is_contiguous(), kMod, ": out must be contiguous");
  } else {
    out = at::empty({b, h, nq, dv}, q.options());
  }
  OptTensor cls, received, entropy;
  if (want_cls) cls = at::empty({b, h, nk}, f32);
  if (want_received) received = at::zeros({b, h, nk}, f32);
  if (want_entropy) entropy = at::empty({b, h, nq}, f32);
  if (bh == 0) return {out, cls, received, entropy};

  // Mask → additive float32 bias (bool: False → -inf), broadcast by strides.
  at::Tensor bias;
  rc::AttnParams p{};
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    check_device(m, "attn_mask");
    RAAD_CHECK_VALUE(m.device() == q.device(), kMod, ": attn_mask is on ", m.device(), ", q on ", q.device());
    RAAD_CHECK_VALUE(m.dim() <= 4, kMod, ": attn_mask must have at most 4 dims, got ", m.dim());
    if (m.scalar_type() == at::kBool) {
      bias = at::zeros(m.sizes(), f32).masked_fill(m.logical_not(), -INFINITY);
    } else {
      dtype_code(m, "attn_mask");
      bias = m.to(at::kFloat);
    }
    bias = bias.expand({b, h, nq, nk});
    p.bias = bias.data_ptr<float>();
    p.bias_sb = bias.stride(0);
    p.bias_sh = bias.stride(1);
    p.bias_sq = bias.stride(2);
    p.bias_sk = bias.stride(3);
  }

  cudaStream_t st = current_stream();
  const float rs = static_cast<float>(1.0 / std::sqrt(static_cast<double>(qdim)));
  const bool second_pass = want_cls || want_received;

  // One workspace allocation for every intermediate (codes, scales, statistics, V, lse).
  const bool bf = dt == rc::kBF16;  // 16-bit P·V operands: bf16 for bf16 inputs (quant.pv_half_dtype)
  Workspace ws;
  const size_t o_qc = ws.take(bh * nq * rb), o_qs = ws.take(bh * nq * 4);
  const size_t o_kc = ws.take(bh * nkp * rb), o_ks = ws.take(bh * nkp * 4);
  const size_t o_kmean = smooth_k ? ws.take(bh * d * 4) : 0;
  const size_t o_vmean0 = pv_bits == 8 ? ws.take(bh * dv * 4) : 0, o_vamax = pv_bits == 8 ? ws.take(bh * dv * 4) : 0;
  const size_t o_vt = ws.take(bh * hd * nkp * (pv_bits == 8 ? 1 : 2));
  const size_t o_vscale = pv_bits == 8 ? ws.take(bh * hd * 4) : 0, o_vmean = pv_bits == 8 ? ws.take(bh * hd * 4) : 0;
  const size_t o_lse = second_pass ? ws.take(bh * nq * 4) : 0;
  at::Tensor work = at::empty({static_cast<int64_t>(ws.size)}, u8);
  uint8_t* w = work.data_ptr<uint8_t>();
  auto F = [w](size_t off) { return reinterpret_cast<float*>(w + off); };

  // Statistics (K mean for smoothing, V mean and centred absmax for int8 P·V): one launch.
  if (smooth_k || pv_bits == 8)
    RAAD_CUDA_OK(rc::channel_stats2(dt, bh, smooth_k ? k.data_ptr() : nullptr, static_cast<int>(nk),
                                    static_cast<int>(d), F(o_kmean), nullptr,
                                    pv_bits == 8 ? v.data_ptr() : nullptr, static_cast<int>(nk),
                                    static_cast<int>(dv), F(o_vmean0), F(o_vamax), st));
  // Q and K: rotation, per-token quantization, packing: one launch.
  RAAD_CUDA_OK(rc::quantize_qk(dt, bh, static_cast<int>(d), rotate, rs, static_cast<int>(qk_bits), hd,
                               q.data_ptr(), static_cast<int>(nq), w + o_qc, F(o_qs), k.data_ptr(),
                               smooth_k ? F(o_kmean) : nullptr, static_cast<int>(nk), nkp, w + o_kc, F(o_ks), st));
  // V: per-channel int8 (pv 8) or 16-bit (pv 16), transposed.
  const int pv_mode = pv_bits == 8 ? 0 : (bf ? 2 : 1);
  if (pv_bits == 8) {
    RAAD_CUDA_OK(rc::prepare_v_int8(v.data_ptr(), dt, F(o_vmean0), F(o_vamax), bh, static_cast<int>(nk), nkp,
                                    static_cast<int>(dv), hd, reinterpret_cast<int8_t*>(w + o_vt), F(o_vscale),
                                    F(o_vmean), st));
  } else {
    RAAD_CUDA_OK(rc::prepare_v_half(v.data_ptr(), dt, bh, static_cast<int>(nk), nkp, static_cast<int>(dv), hd,
                                    bf, reinterpret_cast<uint16_t*>(w + o_vt), st));
  }

  p.q = w + o_qc;
  p.qs = F(o_qs);
  p.k = w + o_kc;
  p.ks = F(o_ks);
  p.v = w + o_vt;
  p.vscale = pv_bits == 8 ? F(o_vscale) : nullptr;
  p.vmean = pv_bits == 8 ? F(o_vmean) : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = dt;
  p.lse = second_pass ? F(o_lse) : nullptr;
  p.entropy = want_entropy ? entropy->data_ptr<float>() : nullptr;
  p.cls = want_cls ? cls->data_ptr<float>() : nullptr;
  p.received = want_received ? received->data_ptr<float>() : nullptr;
  p.bh = bh;
  p.heads = static_cast<int>(h);
  p.nq = static_cast<int>(nq);
  p.nk = static_cast<int>(nk);
  p.nkp = nkp;
  p.dv = static_cast<int>(dv);
  p.qdim = qdim;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  RAAD_CUDA_OK(rc::attention_forward(p, static_cast<int>(qk_bits), pv_mode, hd, st));
  if (second_pass) RAAD_CUDA_OK(rc::attention_maps(p, static_cast<int>(qk_bits), hd, want_received, st));
  return {out, cls, received, entropy};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "raad-kernels CUDA extension: quantized attention kernels (csrc/cuda)";
  m.def("device_count", &raad::cuda_device_count, "CUDA devices visible to the extension's runtime");
  m.def("kernel_binary_version", &raad::cuda_kernel_binary_version,
        "SASS architecture this build runs on the current device (86 = sm_86), or -error when none");
  m.def("quantize", &quantize, "Smoothing, rotation and per-token quantization of x (B, H, N, D) → "
        "(packed codes (B, H, N, row_bytes), float32 scales (B, H, N))",
        py::arg("x"), py::arg("bits"), py::arg("rotate") = false, py::arg("smooth") = false);
  m.def("attention", &attention,
        "Quantized attention → (out, cls, received, entropy); maps not asked for are None",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("qk_bits"), py::arg("pv_bits"), py::arg("scale"),
        py::arg("attn_mask") = py::none(), py::arg("smooth_k") = true, py::arg("rotate") = false,
        py::arg("want_cls") = false, py::arg("want_received") = false, py::arg("want_entropy") = false,
        py::arg("out") = py::none());
#ifdef RAAD_EMU
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif
}
