// Scalar references of the GGUF quantizers and dequantizers: llama.cpp's
// ggml-quants.c algorithms written out one block and one sub-block at a time,
// every float operation in llama.cpp's order (which is what makes the bytes
// match llama-quantize's). Deliberately plain; the fast paths in
// gguf_quants.cc are tested against these byte for byte.
//
// Names in comments are llama.cpp's: quantize_row_q4_0_ref, make_qx_quants,
// make_q3_quants, make_qkx2_quants, make_qkx3_quants, make_qp_quants,
// get_scale_min_k4, nearest_int, dequantize_row_*.
#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/gguf/gguf_quants.h"
#include "worker/engine/util/torch_status.h"

// Bit-exactness needs every product rounded before it is added: no fused
// multiply-add, whatever the build flags (AVX-512F brings FMA instructions
// even without -mfma, and GCC contracts by default).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace compress::engine {
namespace {

constexpr int kQK = 32;  // QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0
constexpr int kQK_K = kGgufQK_K;
// GROUP_MAX_EPS: a group whose largest magnitude is below this is all zero.
constexpr float kGroupMaxEps = 1e-15f;

GgufHalf ToHalf(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
float FromHalf(GgufHalf h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// nearest_int: adding 1.5 * 2^23 leaves round-half-to-even(x) in the low
// mantissa bits, for |x| < 2^22 (beyond that llama.cpp asserts in debug builds
// and reads the same bits in release builds, as here).
int NearestInt(float x) {
  const float biased = x + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &biased, sizeof(bits));
  return (bits & 0x007fffff) - 0x00400000;
}

// C's (int8_t) / (uint8_t) cast of a float as x86-64 compilers emit it:
// truncate to int32 (INT_MIN when out of range, NaN included), keep the low
// byte. Defined for every input, unlike the cast.
int LowByteOfTruncation(float x) {
  const int32_t t = (x >= -2147483648.0f && x < 2147483648.0f) ? static_cast<int32_t>(x) : INT_MIN;
  return t & 0xFF;
}
int8_t TruncToInt8(float x) { return static_cast<int8_t>(LowByteOfTruncation(x)); }
uint8_t TruncToUint8(float x) { return static_cast<uint8_t>(LowByteOfTruncation(x)); }

template <typename Block>
void StoreBlock(const Block& block, uint8_t* out, int64_t index) {
  std::memcpy(out + index * static_cast<int64_t>(sizeof(Block)), &block, sizeof(Block));
}

template <typename Block>
Block LoadBlock(const uint8_t* in, int64_t index) {
  Block block;
  std::memcpy(&block, in + index * static_cast<int64_t>(sizeof(Block)), sizeof(Block));
  return block;
}

void StoreQh(uint32_t qh, uint8_t* bytes) {
  for (int k = 0; k < 4; ++k) bytes[k] = static_cast<uint8_t>(qh >> (8 * k));
}

uint32_t LoadQh(const uint8_t* bytes) {
  uint32_t qh = 0;
  for (int k = 0; k < 4; ++k) qh |= static_cast<uint32_t>(bytes[k]) << (8 * k);
  return qh;
}

// Mean of x^2 over the n values: the sigma2 of the legacy types' importance
// weights (sum in order, then one division).
float MeanSquare(const float* x, int64_t n) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += x[j] * x[j];
  return sum / n;
}

// ---------------------------------------------------------------------------
// The searches.
// ---------------------------------------------------------------------------

// make_qx_quants with rmse_type 1 (the only one the quantizers use): a
// symmetric scale for n values in [-nmax, nmax-1] (L holds l + nmax), first
// from the value of largest magnitude, then the best weighted least-squares
// fit over 18 nearby trial scales. weights null: x^2.
float MakeQxQuants(int n, int nmax, const float* x, int8_t* L, const float* weights) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  auto weight = [&](int i) { return weights != nullptr ? weights[i] : x[i] * x[i]; };
  float iscale = -nmax / max;
  float sumlx = 0.0f;
  float suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, NearestInt(iscale * x[i])));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = weight(i);
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = 0.0f;
    suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(-nmax, std::min(nmax - 1, NearestInt(iscale * x[i])));
      const float w = weight(i);
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = std::max(-nmax, std::min(nmax - 1, NearestInt(iscale * x[i])));
        L[i] = static_cast<int8_t>(l + nmax);
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// make_q3_quants with do_rmse: the symmetric start of make_qx_quants, then up
// to 5 passes of coordinate descent on each code under weights x^2. L holds
// l + nmax.
float MakeQ3Quants(int n, int nmax, const float* x, int8_t* L) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  const float iscale = -nmax / max;
  float sumlx = 0.0f;
  float suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, NearestInt(iscale * x[i])));
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0.0f) {
        float sl2 = suml2 - w * L[i] * L[i];
        int new_l = NearestInt(x[i] * sl2 / slx);
        new_l = std::max(-nmax, std::min(nmax - 1, new_l));
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (sl2 > 0.0f && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (changed == 0) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// The fit shared by make_qkx2_quants and make_qkx3_quants: codes 0..nmax with
// x ~ scale * L - the_min (the_min >= 0), starting from the range and trying
// nstep + 1 scales (rmin + rdelta * is + nmax) / (max - min), each followed by
// the weighted least-squares scale and offset for its codes; keeps the one of
// least weighted error (|diff| with use_mad, diff^2 otherwise). The search
// reads min as it improves, as llama.cpp's loops do. kQkx3 selects make_qkx3's
// variant: a flat group is max <= min, and trial codes clamp before rounding.
template <bool kQkx3>
float MakeQkxQuants(int n, int nmax, const float* x, const float* weights, uint8_t* L,
                    float* the_min, uint8_t* Laux, float rmin, float rdelta, int nstep,
                    bool use_mad) {
  float min = x[0];
  float max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0.0f) min = 0.0f;
  if (kQkx3 ? max <= min : max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.0f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = NearestInt(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_error += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0.0f;
    float sum_l2 = 0.0f;
    float sum_xl = 0.0f;
    for (int i = 0; i < n; ++i) {
      int l;
      if (kQkx3) {
        const float v = iscale * (x[i] - min);
        l = v > 0.0f ? NearestInt(v < nmax ? v : static_cast<float>(nmax)) : 0;
      } else {
        l = std::max(0, std::min(nmax, NearestInt(iscale * (x[i] - min))));
      }
      Laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0.0f) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0.0f) {
        this_min = 0.0f;
        this_scale = sum_xl / sum_l2;
      }
      float error = 0.0f;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        error += weights[i] * diff;
      }
      if (error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

float MakeQkx2Quants(int n, int nmax, const float* x, const float* weights, uint8_t* L,
                     float* the_min, uint8_t* Laux, float rmin, float rdelta, int nstep,
                     bool use_mad) {
  return MakeQkxQuants<false>(n, nmax, x, weights, L, the_min, Laux, rmin, rdelta, nstep,
                              use_mad);
}

float MakeQkx3Quants(int n, int nmax, const float* x, const float* weights, uint8_t* L,
                     float* the_min, uint8_t* Laux, float rmin, float rdelta, int nstep,
                     bool use_mad) {
  return MakeQkxQuants<true>(n, nmax, x, weights, L, the_min, Laux, rmin, rdelta, nstep,
                             use_mad);
}

// make_qp_quants: a scale for n non-negative values (the sub-block scales or
// mins) on codes 0..nmax, weighted by quant_weights: 9 trial scales around
// nmax / max, then 5 passes of coordinate descent.
float MakeQpQuants(int n, int nmax, const float* x, uint8_t* L, const float* quant_weights) {
  float max = 0.0f;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(NearestInt(iscale * x[i]));
  const float scale = 1 / iscale;
  float best_mse = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best_mse += quant_weights[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float trial_iscale = (0.1f * is + nmax) / max;
    const float trial_scale = 1 / trial_iscale;
    float mse = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, NearestInt(trial_iscale * x[i]));
      const float diff = x[i] - trial_scale * l;
      mse += quant_weights[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = trial_iscale;
    }
  }
  float sumlx = 0.0f;
  float suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, NearestInt(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    const float w = quant_weights[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = quant_weights[i];
      float slx = sumlx - w * x[i] * L[i];
      float sl2 = suml2 - w * L[i] * L[i];
      if (slx > 0.0f && sl2 > 0.0f) {
        const int new_l = std::min(nmax, NearestInt(x[i] * sl2 / slx));
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (changed == 0) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// get_scale_min_k4: sub-block j's 6-bit scale and min from Q4_K/Q5_K's 12 bytes.
void GetScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// The inverse packing, as quantize_row_q4_K_ref writes it (bytes start zeroed
// for j >= 4 to OR into; j < 4 comes first and assigns).
void PutScaleMinK4(int j, uint8_t ls, uint8_t lm, uint8_t* q) {
  if (j < 4) {
    q[j] = ls;
    q[j + 4] = lm;
  } else {
    q[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
    q[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
    q[j] |= static_cast<uint8_t>((lm >> 4) << 6);
  }
}

// Q2_K/Q3_K's qs: four 2-bit codes a byte, L[128h + 32s + l] at bits 2s of
// qs[32h + l].
void Pack2Bit(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < kQK_K; h += 128) {
    for (int l = 0; l < 32; ++l) {
      qs[h / 4 + l] = static_cast<uint8_t>(L[h + l] | (L[h + l + 32] << 2) | (L[h + l + 64] << 4) |
                                           (L[h + l + 96] << 6));
    }
  }
}

// Q3_K's 6-bit scale of sub-block j (0..63, 32 meaning zero) as packed.
int Q3KScale(const uint8_t* scales, int j) {
  const int low = j < 8 ? scales[j] & 0xF : scales[j - 8] >> 4;
  return low | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4);
}

void PutQ3KScale(int j, int l, uint8_t* scales) {
  if (j < 8) {
    scales[j] = static_cast<uint8_t>(l & 0xF);
  } else {
    scales[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
  }
  scales[j % 4 + 8] |= static_cast<uint8_t>((l >> 4) << (2 * (j / 4)));
}

// The tail of quantize_row_q3_K_ref / _impl once the scales are packed:
// requantize every sub-block with its stored scale, split off the high bits.
void FinishQ3K(const float* x, int8_t* L, BlockQ3_K& y) {
  const float d = FromHalf(y.d);
  for (int j = 0; j < kQK_K / 16; ++j) {
    const float dl = d * (Q3KScale(y.scales, j) - 32);
    if (dl == 0.0f) continue;
    for (int ii = 0; ii < 16; ++ii) {
      const int l = std::max(-4, std::min(3, NearestInt(x[16 * j + ii] / dl)));
      L[16 * j + ii] = static_cast<int8_t>(l + 4);
    }
  }
  std::memset(y.hmask, 0, sizeof(y.hmask));
  uint8_t codes[kQK_K];
  for (int j = 0; j < kQK_K; ++j) {
    int l = L[j];
    if (l > 3) {
      y.hmask[j % 32] |= static_cast<uint8_t>(1 << (j / 32));
      l -= 4;
    }
    codes[j] = static_cast<uint8_t>(l);
  }
  Pack2Bit(codes, y.qs);
}

// The tail of the Q4_K/Q5_K quantizers: requantize each sub-block of 32 with
// its stored 6-bit scale and min into 0..nmax.
void RequantizeK4(const float* x, const uint8_t* scales, float d, float dmin, int nmax,
                  uint8_t* L) {
  for (int j = 0; j < kQK_K / 32; ++j) {
    uint8_t sc;
    uint8_t m;
    GetScaleMinK4(j, scales, &sc, &m);
    const float dl = d * sc;
    if (dl == 0.0f) continue;
    const float ml = dmin * m;
    for (int ii = 0; ii < 32; ++ii) {
      const int l = NearestInt((x[32 * j + ii] + ml) / dl);
      L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

// "tensor 'name' [shape] as TYPE", as the fast path's messages begin.
std::string Describe(absl::string_view name, const std::vector<int64_t>& shape, GgufType type) {
  return absl::StrCat("tensor '", name, "' [", absl::StrJoin(shape, ", "), "] as ",
                      GgufTypeOf(type).name);
}

}  // namespace

// ---------------------------------------------------------------------------
// F32, F16, BF16.
// ---------------------------------------------------------------------------

void QuantizeRowF32Reference(const float* x, int64_t n, const float*, uint8_t* out) {
  std::memcpy(out, x, n * sizeof(float));
}

void DequantizeRowF32Reference(const uint8_t* in, int64_t n, float* out) {
  std::memcpy(out, in, n * sizeof(float));
}

// ggml_fp32_to_fp16_row: round to nearest even, Inf past 65504.
void QuantizeRowF16Reference(const float* x, int64_t n, const float*, uint8_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    const GgufHalf h = ToHalf(x[j]);
    out[2 * j] = static_cast<uint8_t>(h);
    out[2 * j + 1] = static_cast<uint8_t>(h >> 8);
  }
}

void DequantizeRowF16Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = FromHalf(static_cast<GgufHalf>(in[2 * j] | (in[2 * j + 1] << 8)));
  }
}

// ggml_fp32_to_bf16_row_ref (ggml_compute_fp32_to_bf16): the top 16 bits,
// rounded to nearest even; NaN made quiet.
void QuantizeRowBF16Reference(const float* x, int64_t n, const float*, uint8_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, &x[j], sizeof(u));
    GgufBf16 b;
    if ((u & 0x7fffffff) > 0x7f800000) {
      b = static_cast<GgufBf16>((u >> 16) | 64);
    } else {
      b = static_cast<GgufBf16>((u + (0x7fff + ((u >> 16) & 1))) >> 16);
    }
    out[2 * j] = static_cast<uint8_t>(b);
    out[2 * j + 1] = static_cast<uint8_t>(b >> 8);
  }
}

void DequantizeRowBF16Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(in[2 * j] | (in[2 * j + 1] << 8)) << 16;
    std::memcpy(&out[j], &u, sizeof(u));
  }
}

// ---------------------------------------------------------------------------
// Q8_0 (quantize_row_q8_0_ref; quantize_q8_0 ignores quant_weights).
// ---------------------------------------------------------------------------

void QuantizeRowQ8_0Reference(const float* x, int64_t n, const float*, uint8_t* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* xb = x + b * kQK;
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / ((1 << 7) - 1);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ8_0 y;
    y.d = ToHalf(d);
    for (int j = 0; j < kQK; ++j) y.qs[j] = TruncToInt8(std::roundf(xb[j] * id));
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ8_0Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ8_0 y = LoadBlock<BlockQ8_0>(in, b);
    const float d = FromHalf(y.d);
    for (int j = 0; j < kQK; ++j) out[b * kQK + j] = y.qs[j] * d;
  }
}

// ---------------------------------------------------------------------------
// Q4_0, Q5_0: quantize_row_q{4,5}_0_ref (d = the signed value of largest
// magnitude / -2^(bits-1), codes x / d + 2^(bits-1) rounded half up);
// with importance quantize_row_q{4,5}_0_impl (make_qx_quants).
// ---------------------------------------------------------------------------

namespace {

// The signed value of largest magnitude (the first of equals).
float SignedAbsMax(const float* x, int n) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

// Weights of the legacy types' searches: importance * sqrt(sigma2 + x^2).
void LegacyWeights(const float* xb, const float* importance, float sigma2, float* weight) {
  for (int j = 0; j < kQK; ++j) weight[j] = importance[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
}

}  // namespace

void QuantizeRowQ4_0Reference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  const float sigma2 = importance != nullptr ? MeanSquare(x, n) : 0.0f;
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* xb = x + b * kQK;
    BlockQ4_0 y;
    if (importance == nullptr) {
      const float d = SignedAbsMax(xb, kQK) / -8;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      y.d = ToHalf(d);
      for (int j = 0; j < 16; ++j) {
        const int q0 = std::min<int>(15, TruncToInt8(xb[j] * id + 8.5f));
        const int q1 = std::min<int>(15, TruncToInt8(xb[j + 16] * id + 8.5f));
        y.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
      }
    } else {
      float weight[kQK];
      int8_t L[kQK];
      LegacyWeights(xb, importance + b * kQK, sigma2, weight);
      y.d = ToHalf(MakeQxQuants(kQK, 8, xb, L, weight));
      for (int j = 0; j < 16; ++j) y.qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    }
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ4_0Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ4_0 y = LoadBlock<BlockQ4_0>(in, b);
    const float d = FromHalf(y.d);
    for (int j = 0; j < 16; ++j) {
      out[b * kQK + j] = ((y.qs[j] & 0x0F) - 8) * d;
      out[b * kQK + j + 16] = ((y.qs[j] >> 4) - 8) * d;
    }
  }
}

void QuantizeRowQ5_0Reference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  const float sigma2 = importance != nullptr ? MeanSquare(x, n) : 0.0f;
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* xb = x + b * kQK;
    uint8_t q[kQK];
    BlockQ5_0 y;
    if (importance == nullptr) {
      const float d = SignedAbsMax(xb, kQK) / -16;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      y.d = ToHalf(d);
      for (int j = 0; j < kQK; ++j) {
        q[j] = static_cast<uint8_t>(std::min<int>(31, TruncToInt8(xb[j] * id + 16.5f)));
      }
    } else {
      float weight[kQK];
      int8_t L[kQK];
      LegacyWeights(xb, importance + b * kQK, sigma2, weight);
      y.d = ToHalf(MakeQxQuants(kQK, 16, xb, L, weight));
      for (int j = 0; j < kQK; ++j) q[j] = static_cast<uint8_t>(L[j]);
    }
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      y.qs[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
      qh |= ((q[j] & 0x10u) >> 4) << j;
      qh |= ((q[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    StoreQh(qh, y.qh);
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ5_0Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ5_0 y = LoadBlock<BlockQ5_0>(in, b);
    const float d = FromHalf(y.d);
    const uint32_t qh = LoadQh(y.qh);
    for (int j = 0; j < 16; ++j) {
      const int high0 = ((qh >> j) << 4) & 0x10;
      const int high1 = (qh >> (j + 12)) & 0x10;
      out[b * kQK + j] = (((y.qs[j] & 0x0F) | high0) - 16) * d;
      out[b * kQK + j + 16] = (((y.qs[j] >> 4) | high1) - 16) * d;
    }
  }
}

// ---------------------------------------------------------------------------
// Q4_1, Q5_1: quantize_row_q{4,5}_1_ref (d = range / (2^bits - 1), m = min,
// codes (x - min) / d rounded half up); with importance
// quantize_row_q{4,5}_1_impl (make_qkx3_quants).
// ---------------------------------------------------------------------------

void QuantizeRowQ4_1Reference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  const float sigma2 = importance != nullptr ? MeanSquare(x, n) : 0.0f;
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* xb = x + b * kQK;
    BlockQ4_1 y;
    if (importance == nullptr) {
      float min = FLT_MAX;
      float max = -FLT_MAX;
      for (int j = 0; j < kQK; ++j) {
        if (xb[j] < min) min = xb[j];
        if (xb[j] > max) max = xb[j];
      }
      const float d = (max - min) / ((1 << 4) - 1);
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      y.d = ToHalf(d);
      y.m = ToHalf(min);
      for (int j = 0; j < 16; ++j) {
        const int q0 = std::min<int>(15, TruncToInt8((xb[j] - min) * id + 0.5f));
        const int q1 = std::min<int>(15, TruncToInt8((xb[j + 16] - min) * id + 0.5f));
        y.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
      }
    } else {
      float weight[kQK];
      uint8_t L[kQK];
      uint8_t Laux[kQK];
      float the_min;
      LegacyWeights(xb, importance + b * kQK, sigma2, weight);
      const float d =
          MakeQkx3Quants(kQK, 15, xb, weight, L, &the_min, Laux, -0.9f, 0.05f, 36, false);
      y.d = ToHalf(d);
      y.m = ToHalf(-the_min);
      for (int j = 0; j < 16; ++j) y.qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    }
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ4_1Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ4_1 y = LoadBlock<BlockQ4_1>(in, b);
    const float d = FromHalf(y.d);
    const float m = FromHalf(y.m);
    for (int j = 0; j < 16; ++j) {
      out[b * kQK + j] = (y.qs[j] & 0x0F) * d + m;
      out[b * kQK + j + 16] = (y.qs[j] >> 4) * d + m;
    }
  }
}

void QuantizeRowQ5_1Reference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  const float sigma2 = importance != nullptr ? MeanSquare(x, n) : 0.0f;
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* xb = x + b * kQK;
    uint8_t q[kQK];
    BlockQ5_1 y;
    if (importance == nullptr) {
      float min = FLT_MAX;
      float max = -FLT_MAX;
      for (int j = 0; j < kQK; ++j) {
        if (xb[j] < min) min = xb[j];
        if (xb[j] > max) max = xb[j];
      }
      const float d = (max - min) / ((1 << 5) - 1);
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      y.d = ToHalf(d);
      y.m = ToHalf(min);
      // No clamp: (x - min) / d stays below 31.5.
      for (int j = 0; j < kQK; ++j) q[j] = TruncToUint8((xb[j] - min) * id + 0.5f);
    } else {
      float weight[kQK];
      uint8_t Laux[kQK];
      float the_min;
      LegacyWeights(xb, importance + b * kQK, sigma2, weight);
      const float d =
          MakeQkx3Quants(kQK, 31, xb, weight, q, &the_min, Laux, -0.9f, 0.05f, 36, false);
      y.d = ToHalf(d);
      y.m = ToHalf(-the_min);
    }
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      y.qs[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
      qh |= ((q[j] & 0x10u) >> 4) << j;
      qh |= ((q[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    StoreQh(qh, y.qh);
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ5_1Reference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ5_1 y = LoadBlock<BlockQ5_1>(in, b);
    const float d = FromHalf(y.d);
    const float m = FromHalf(y.m);
    const uint32_t qh = LoadQh(y.qh);
    for (int j = 0; j < 16; ++j) {
      const int high0 = ((qh >> j) << 4) & 0x10;
      const int high1 = (qh >> (j + 12)) & 0x10;
      out[b * kQK + j] = ((y.qs[j] & 0x0F) | high0) * d + m;
      out[b * kQK + j + 16] = ((y.qs[j] >> 4) | high1) * d + m;
    }
  }
}

// ---------------------------------------------------------------------------
// Q2_K: quantize_row_q2_K_ref (make_qkx2_quants with weights |x| and MAD,
// 4-bit scales and mins against their maxima); with importance
// quantize_row_q2_K_impl (make_qkx3_quants, make_qp_quants).
// ---------------------------------------------------------------------------

void QuantizeRowQ2_KReference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  constexpr float kQ4Scale = 15.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    uint8_t L[kQK_K];
    uint8_t Laux[16];
    float weights[16];
    float scales[kQK_K / 16];
    float mins[kQK_K / 16];
    BlockQ2_K y;
    if (importance == nullptr) {
      float max_scale = 0.0f;
      float max_min = 0.0f;
      for (int j = 0; j < kQK_K / 16; ++j) {
        for (int l = 0; l < 16; ++l) weights[l] = std::fabs(xb[16 * j + l]);
        scales[j] = MakeQkx2Quants(16, 3, xb + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f,
                                   0.1f, 15, true);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
      }
      if (max_scale > 0.0f) {
        const float iscale = kQ4Scale / max_scale;
        for (int j = 0; j < kQK_K / 16; ++j) {
          y.scales[j] = static_cast<uint8_t>(NearestInt(iscale * scales[j]));
        }
        y.d = ToHalf(max_scale / kQ4Scale);
      } else {
        for (int j = 0; j < kQK_K / 16; ++j) y.scales[j] = 0;
        y.d = ToHalf(0.0f);
      }
      if (max_min > 0.0f) {
        const float iscale = kQ4Scale / max_min;
        for (int j = 0; j < kQK_K / 16; ++j) {
          const int l = NearestInt(iscale * mins[j]);
          y.scales[j] = static_cast<uint8_t>(y.scales[j] | (l << 4));
        }
        y.dmin = ToHalf(max_min / kQ4Scale);
      } else {
        y.dmin = ToHalf(0.0f);
      }
    } else {
      const float* qw = importance + b * kQK_K;
      float sumx2 = 0.0f;
      for (int j = 0; j < kQK_K; ++j) sumx2 += xb[j] * xb[j];
      const float sigma2 = sumx2 / kQK_K;
      float sw[kQK_K / 16];
      uint8_t Ls[kQK_K / 16];
      uint8_t Lm[kQK_K / 16];
      for (int j = 0; j < kQK_K / 16; ++j) {
        sw[j] = 0.0f;
        for (int l = 0; l < 16; ++l) {
          weights[l] = qw[16 * j + l] * std::sqrt(sigma2 + xb[16 * j + l] * xb[16 * j + l]);
        }
        for (int l = 0; l < 16; ++l) sw[j] += weights[l];
        scales[j] = MakeQkx3Quants(16, 3, xb + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.9f,
                                   0.05f, 36, false);
      }
      const float dm = MakeQpQuants(kQK_K / 16, 15, scales, Ls, sw);
      const float mm = MakeQpQuants(kQK_K / 16, 15, mins, Lm, sw);
      y.d = ToHalf(dm);
      y.dmin = ToHalf(mm);
      for (int j = 0; j < kQK_K / 16; ++j) y.scales[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
    }
    // Requantize with the stored scales (sub-blocks whose scale is 0 keep
    // the search's codes).
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    for (int j = 0; j < kQK_K / 16; ++j) {
      const float dl = d * (y.scales[j] & 0xF);
      if (dl == 0.0f) continue;
      const float ml = dmin * (y.scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) {
        const int l = NearestInt((xb[16 * j + ii] + ml) / dl);
        L[16 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
      }
    }
    Pack2Bit(L, y.qs);
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ2_KReference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ2_K y = LoadBlock<BlockQ2_K>(in, b);
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    float* o = out + b * kQK_K;
    // Element 128h + 32s + l: bits 2s of qs[32h + l], scale 16ths in order.
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = y.scales[8 * h + 2 * s + half];
          const float dl = d * (sc & 0xF);
          const float ml = dmin * (sc >> 4);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int q = (y.qs[32 * h + l] >> (2 * s)) & 3;
            o[128 * h + 32 * s + l] = dl * q - ml;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Q3_K: quantize_row_q3_K_ref (make_q3_quants, 6-bit signed scales against
// the one of largest magnitude); with importance quantize_row_q3_K_impl
// (make_qx_quants for codes, then for the scales).
// ---------------------------------------------------------------------------

void QuantizeRowQ3_KReference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    int8_t L[kQK_K];
    float scales[kQK_K / 16];
    BlockQ3_K y;
    std::memset(y.scales, 0, sizeof(y.scales));
    if (importance == nullptr) {
      float max_scale = 0.0f;
      float amax = 0.0f;
      for (int j = 0; j < kQK_K / 16; ++j) {
        scales[j] = MakeQ3Quants(16, 4, xb + 16 * j, L + 16 * j);
        const float scale = std::fabs(scales[j]);
        if (scale > amax) {
          amax = scale;
          max_scale = scales[j];
        }
      }
      if (max_scale != 0.0f) {
        const float iscale = -32.0f / max_scale;
        for (int j = 0; j < kQK_K / 16; ++j) {
          int8_t l = static_cast<int8_t>(NearestInt(iscale * scales[j]));
          l = static_cast<int8_t>(std::max<int>(-32, std::min<int>(31, l)) + 32);
          PutQ3KScale(j, l, y.scales);
        }
        y.d = ToHalf(1 / iscale);
      } else {
        y.d = ToHalf(0.0f);
      }
    } else {
      const float* qw = importance + b * kQK_K;
      float sumx2 = 0.0f;
      for (int j = 0; j < kQK_K; ++j) sumx2 += xb[j] * xb[j];
      const float sigma2 = 2 * sumx2 / kQK_K;
      float weight[16];
      float sw[kQK_K / 16];
      int8_t Ls[kQK_K / 16];
      for (int j = 0; j < kQK_K / 16; ++j) {
        for (int l = 0; l < 16; ++l) {
          weight[l] = qw[16 * j + l] * std::sqrt(sigma2 + xb[16 * j + l] * xb[16 * j + l]);
        }
        float sumw = 0.0f;
        for (int l = 0; l < 16; ++l) sumw += weight[l];
        sw[j] = sumw;
        scales[j] = MakeQxQuants(16, 4, xb + 16 * j, L + 16 * j, weight);
      }
      const float d_block = MakeQxQuants(kQK_K / 16, 32, scales, Ls, sw);
      for (int j = 0; j < kQK_K / 16; ++j) PutQ3KScale(j, Ls[j], y.scales);
      y.d = ToHalf(d_block);
    }
    FinishQ3K(xb, L, y);
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ3_KReference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ3_K y = LoadBlock<BlockQ3_K>(in, b);
    const float d = FromHalf(y.d);
    float* o = out + b * kQK_K;
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        for (int half = 0; half < 2; ++half) {
          const int sub = 8 * h + 2 * s + half;
          const float dl = d * (Q3KScale(y.scales, sub) - 32);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int low = (y.qs[32 * h + l] >> (2 * s)) & 3;
            const bool high = (y.hmask[l] >> (4 * h + s)) & 1;
            o[128 * h + 32 * s + l] = dl * (low - (high ? 0 : 4));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Q4_K, Q5_K: quantize_row_q{4,5}_K_ref (make_qkx2_quants weighted by
// av_x + |x|, 6-bit scales and mins against their maxima); with importance
// quantize_row_q{4,5}_K_impl (make_qkx3_quants, make_qp_quants).
// ---------------------------------------------------------------------------

namespace {

// Fills y's d, dmin, scales and the codes L (0..nmax) of one super-block.
template <typename Block>
void QuantizeK4Scales(const float* xb, const float* qw, int nmax, Block& y, uint8_t* L) {
  uint8_t Laux[32];
  float weights[32];
  float scales[kQK_K / 32];
  float mins[kQK_K / 32];
  std::memset(y.scales, 0, sizeof(y.scales));
  if (qw == nullptr) {
    const float rmin = nmax == 15 ? -1.0f : -0.5f;
    const int nstep = nmax == 15 ? 20 : 15;
    float max_scale = 0.0f;
    float max_min = 0.0f;
    for (int j = 0; j < kQK_K / 32; ++j) {
      float sum_x2 = 0.0f;
      for (int l = 0; l < 32; ++l) sum_x2 += xb[32 * j + l] * xb[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xb[32 * j + l]);
      scales[j] = MakeQkx2Quants(32, nmax, xb + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin,
                                 0.1f, nstep, false);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < kQK_K / 32; ++j) {
      uint8_t ls = static_cast<uint8_t>(NearestInt(inv_scale * scales[j]));
      uint8_t lm = static_cast<uint8_t>(NearestInt(inv_min * mins[j]));
      ls = std::min<uint8_t>(63, ls);
      lm = std::min<uint8_t>(63, lm);
      PutScaleMinK4(j, ls, lm, y.scales);
    }
    y.d = ToHalf(max_scale / 63.0f);
    y.dmin = ToHalf(max_min / 63.0f);
  } else {
    float sum_x2 = 0.0f;
    for (int l = 0; l < kQK_K; ++l) sum_x2 += xb[l] * xb[l];
    const float sigma2 = 2 * sum_x2 / kQK_K;
    float sw[kQK_K / 32];
    uint8_t Ls[kQK_K / 32];
    uint8_t Lm[kQK_K / 32];
    for (int j = 0; j < kQK_K / 32; ++j) {
      for (int l = 0; l < 32; ++l) {
        weights[l] = qw[32 * j + l] * std::sqrt(sigma2 + xb[32 * j + l] * xb[32 * j + l]);
      }
      float sumw = 0.0f;
      for (int l = 0; l < 32; ++l) sumw += weights[l];
      sw[j] = sumw;
      scales[j] = MakeQkx3Quants(32, nmax, xb + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.9f,
                                 0.05f, 36, false);
    }
    const float d_block = MakeQpQuants(kQK_K / 32, 63, scales, Ls, sw);
    const float m_block = MakeQpQuants(kQK_K / 32, 63, mins, Lm, sw);
    for (int j = 0; j < kQK_K / 32; ++j) {
      uint8_t ls = Ls[j];
      uint8_t lm = Lm[j];
      if (nmax == 31) {  // quantize_row_q5_K_impl clamps; q4_K_impl does not
        ls = std::min<uint8_t>(63, ls);
        lm = std::min<uint8_t>(63, lm);
      }
      PutScaleMinK4(j, ls, lm, y.scales);
    }
    y.d = ToHalf(d_block);
    y.dmin = ToHalf(m_block);
  }
  RequantizeK4(xb, y.scales, FromHalf(y.d), FromHalf(y.dmin), nmax, L);
}

// Q4_K/Q5_K dequantization, sub-block pairs of 64: low nibbles then high.
template <typename Block, bool kHighBit>
void DequantizeK4(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const Block y = LoadBlock<Block>(in, b);
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    float* o = out + b * kQK_K;
    for (int c = 0; c < 4; ++c) {
      uint8_t sc;
      uint8_t m;
      GetScaleMinK4(2 * c, y.scales, &sc, &m);
      const float d1 = d * sc;
      const float m1 = dmin * m;
      GetScaleMinK4(2 * c + 1, y.scales, &sc, &m);
      const float d2 = d * sc;
      const float m2 = dmin * m;
      for (int l = 0; l < 32; ++l) {
        int q1 = y.qs[32 * c + l] & 0xF;
        int q2 = y.qs[32 * c + l] >> 4;
        if constexpr (kHighBit) {
          q1 += (y.qh[l] >> (2 * c)) & 1 ? 16 : 0;
          q2 += (y.qh[l] >> (2 * c + 1)) & 1 ? 16 : 0;
        }
        o[64 * c + l] = d1 * q1 - m1;
        o[64 * c + 32 + l] = d2 * q2 - m2;
      }
    }
  }
}

}  // namespace

void QuantizeRowQ4_KReference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    uint8_t L[kQK_K];
    BlockQ4_K y;
    QuantizeK4Scales(xb, importance != nullptr ? importance + b * kQK_K : nullptr, 15, y, L);
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        y.qs[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
      }
    }
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ4_KReference(const uint8_t* in, int64_t n, float* out) {
  DequantizeK4<BlockQ4_K, false>(in, n, out);
}

void QuantizeRowQ5_KReference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    uint8_t L[kQK_K];
    BlockQ5_K y;
    QuantizeK4Scales(xb, importance != nullptr ? importance + b * kQK_K : nullptr, 31, y, L);
    std::memset(y.qh, 0, sizeof(y.qh));
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        int l1 = L[64 * c + l];
        int l2 = L[64 * c + 32 + l];
        if (l1 > 15) {
          l1 -= 16;
          y.qh[l] |= static_cast<uint8_t>(1 << (2 * c));
        }
        if (l2 > 15) {
          l2 -= 16;
          y.qh[l] |= static_cast<uint8_t>(2 << (2 * c));
        }
        y.qs[32 * c + l] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
    }
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ5_KReference(const uint8_t* in, int64_t n, float* out) {
  DequantizeK4<BlockQ5_K, true>(in, n, out);
}

// ---------------------------------------------------------------------------
// Q6_K: quantize_row_q6_K_ref (make_qx_quants weighted by x^2, int8 scales
// against the one of largest magnitude); with importance quantize_row_q6_K_impl
// (the same, weighted by the importance itself).
// ---------------------------------------------------------------------------

void QuantizeRowQ6_KReference(const float* x, int64_t n, const float* importance,
                              uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    int8_t L[kQK_K];
    float scales[kQK_K / 16];
    float max_scale = 0.0f;
    float max_abs_scale = 0.0f;
    for (int j = 0; j < kQK_K / 16; ++j) {
      const float* qw = importance != nullptr ? importance + b * kQK_K + 16 * j : nullptr;
      scales[j] = MakeQxQuants(16, 32, xb + 16 * j, L + 16 * j, qw);
      const float abs_scale = std::fabs(scales[j]);
      if (abs_scale > max_abs_scale) {
        max_abs_scale = abs_scale;
        max_scale = scales[j];
      }
    }
    BlockQ6_K y;
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&y, 0, sizeof(y));
      y.d = ToHalf(0.0f);
      StoreBlock(y, out, b);
      continue;
    }
    const float iscale = -128.0f / max_scale;
    y.d = ToHalf(1 / iscale);
    for (int j = 0; j < kQK_K / 16; ++j) {
      y.scales[j] = static_cast<int8_t>(std::min(127, NearestInt(iscale * scales[j])));
    }
    const float d = FromHalf(y.d);
    for (int j = 0; j < kQK_K / 16; ++j) {
      const float dl = d * y.scales[j];
      if (dl == 0.0f) continue;
      for (int ii = 0; ii < 16; ++ii) {
        const int l = std::max(-32, std::min(31, NearestInt(xb[16 * j + ii] / dl)));
        L[16 * j + ii] = static_cast<int8_t>(l + 32);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int8_t* Lh = L + 128 * h;
      for (int l = 0; l < 32; ++l) {
        const int q1 = Lh[l];
        const int q2 = Lh[l + 32];
        const int q3 = Lh[l + 64];
        const int q4 = Lh[l + 96];
        y.ql[64 * h + l] = static_cast<uint8_t>((q1 & 0xF) | ((q3 & 0xF) << 4));
        y.ql[64 * h + 32 + l] = static_cast<uint8_t>((q2 & 0xF) | ((q4 & 0xF) << 4));
        y.qh[32 * h + l] =
            static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
      }
    }
    StoreBlock(y, out, b);
  }
}

void DequantizeRowQ6_KReference(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ6_K y = LoadBlock<BlockQ6_K>(in, b);
    const float d = FromHalf(y.d);
    float* o = out + b * kQK_K;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const uint8_t ql0 = y.ql[64 * h + l];
        const uint8_t ql1 = y.ql[64 * h + 32 + l];
        const uint8_t qh = y.qh[32 * h + l];
        const int q1 = static_cast<int8_t>((ql0 & 0xF) | (((qh >> 0) & 3) << 4)) - 32;
        const int q2 = static_cast<int8_t>((ql1 & 0xF) | (((qh >> 2) & 3) << 4)) - 32;
        const int q3 = static_cast<int8_t>((ql0 >> 4) | (((qh >> 4) & 3) << 4)) - 32;
        const int q4 = static_cast<int8_t>((ql1 >> 4) | (((qh >> 6) & 3) << 4)) - 32;
        const int8_t* sc = y.scales + 8 * h;
        o[128 * h + l] = d * sc[is] * q1;
        o[128 * h + l + 32] = d * sc[is + 2] * q2;
        o[128 * h + l + 64] = d * sc[is + 4] * q3;
        o[128 * h + l + 96] = d * sc[is + 6] * q4;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Tensors, one row at a time.
// ---------------------------------------------------------------------------

absl::StatusOr<std::string> QuantizeGgufTensorReference(const at::Tensor& weight, GgufType type,
                                                        const at::Tensor& importance,
                                                        absl::string_view name) {
  if (!weight.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': undefined weight"));
  }
  ASSIGN_OR_RETURN(const GgufTensorLayout layout,
                   GgufLayoutOf(type, weight.sizes().vec(), name));
  const GgufQuantizer* quantizer = FindGgufQuantizer(type);
  const std::string what = Describe(name, weight.sizes().vec(), type);
  return CatchTorchErrors(
      absl::StrCat("gguf reference: tensor '", name, "'"), [&]() -> absl::StatusOr<std::string> {
        if (weight.scalar_type() != at::kFloat && weight.scalar_type() != at::kHalf &&
            weight.scalar_type() != at::kBFloat16) {
          return absl::InvalidArgumentError(
              absl::StrCat(what, ": needs an F32, F16 or BF16 ",
                           "weight, not ", c10::toString(weight.scalar_type())));
        }
        const at::Tensor w =
            weight.to(at::kCPU, at::kFloat).contiguous().view({layout.rows, layout.row_elements});
        at::Tensor qw;
        if (importance.defined()) {
          if (importance.dim() != 1 || importance.size(0) != layout.row_elements) {
            return absl::InvalidArgumentError(
                absl::StrCat(what, ": importance needs ",
                             layout.row_elements, " weights, one per column"));
          }
          qw = importance.to(at::kCPU, at::kFloat).contiguous();
          const float* q = qw.data_ptr<float>();
          for (int64_t j = 0; j < layout.row_elements; ++j) {
            if (!std::isfinite(q[j]) || q[j] < 0.0f) {
              return absl::InvalidArgumentError(
                  absl::StrCat(what, ": importance[", j, "] = ",
                               q[j], " is not a finite non-negative weight"));
            }
          }
        }
        std::string bytes(static_cast<size_t>(layout.bytes), '\0');
        std::vector<float> check(static_cast<size_t>(layout.row_elements));
        for (int64_t r = 0; r < layout.rows; ++r) {
          const float* x = w.data_ptr<float>() + r * layout.row_elements;
          for (int64_t j = 0; j < layout.row_elements; ++j) {
            if (!std::isfinite(x[j])) {
              return absl::InvalidArgumentError(
                  absl::StrCat(what, ": row ", r, " contains NaN or Inf"));
            }
          }
          uint8_t* row_out = reinterpret_cast<uint8_t*>(bytes.data()) + r * layout.row_bytes;
          quantizer->quantize_row_reference(x, layout.row_elements,
                                            qw.defined() ? qw.data_ptr<float>() : nullptr, row_out);
          quantizer->dequantize_row_reference(row_out, layout.row_elements, check.data());
          for (float v : check) {
            if (!std::isfinite(v)) {
              return absl::InvalidArgumentError(
                  absl::StrCat(what, ": row ", r,
                               " does not fit: its quantized values overflow float16"));
            }
          }
        }
        return bytes;
      });
}

absl::StatusOr<at::Tensor> DequantizeGgufTensorReference(absl::string_view bytes, GgufType type,
                                                         const std::vector<int64_t>& shape,
                                                         absl::string_view name) {
  ASSIGN_OR_RETURN(const GgufTensorLayout layout, GgufLayoutOf(type, shape, name));
  if (static_cast<int64_t>(bytes.size()) != layout.bytes) {
    return absl::InvalidArgumentError(absl::StrCat(Describe(name, shape, type), ": ",
                                                   bytes.size(), " bytes, expected ",
                                                   layout.bytes));
  }
  const GgufQuantizer* quantizer = FindGgufQuantizer(type);
  return CatchTorchErrors(absl::StrCat("gguf reference: tensor '", name, "'"),
                          [&]() -> absl::StatusOr<at::Tensor> {
                            at::Tensor out = at::empty(shape, at::kFloat);
                            float* o = out.data_ptr<float>();
                            const uint8_t* in = reinterpret_cast<const uint8_t*>(bytes.data());
                            for (int64_t r = 0; r < layout.rows; ++r) {
                              quantizer->dequantize_row_reference(in + r * layout.row_bytes,
                                                                  layout.row_elements,
                                                                  o + r * layout.row_elements);
                            }
                            return out;
                          });
}

}  // namespace compress::engine
