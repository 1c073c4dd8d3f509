// GGUF quantization, the fast path, and the quantizer table.
//
// The searches of llama.cpp's k-quants (make_qkx2/qkx3/qx/q3_quants) take
// nearly all the time, and each is a chain of dependent float sums over one
// group (a sub-block, or a block of the legacy types). Reordering those sums
// would change the bytes, so instead of vectorizing inside a group this file
// runs W independent groups side by side, one per SIMD lane (GCC vector
// extensions): every lane performs the reference's float operations in the
// reference's order, and branches become per-lane selects. The glue between
// searches (scale quantization, packing) is scalar; requantization and the
// plain block types vectorize along the elements.
//
// Each row function exists for AVX2 (W = 8) and for baseline x86-64 (SSE2,
// W = 4), picked once at first use. W is the native register width on
// purpose: GCC 12 lowers comparisons of wider vectors lane by lane, and under
// target("avx512f") even 16-lane ones. Neither variant may fuse multiply-adds
// (see the pragma below), so both produce the reference's bytes.
#include "worker/engine/gguf/gguf_quants.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

// Vectors wider than SSE registers change the calling convention; they never
// cross a call here (every helper taking one is always_inline).
#pragma GCC diagnostic ignored "-Wpsabi"

// Bit-exactness needs every product rounded before it is added: no fused
// multiply-add, whatever the build flags (GCC contracts by default wherever
// the target has FMA). sqrtf without errno lets the weight loops vectorize;
// it is correctly rounded either way and never sees a negative argument.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-math-errno")
#endif

#define GGUF_INLINE inline __attribute__((always_inline))

namespace compress::engine {
namespace {

constexpr int kQK = 32;
constexpr int kQK_K = kGgufQK_K;
constexpr float kGroupMaxEps = 1e-15f;  // GROUP_MAX_EPS

// ---------------------------------------------------------------------------
// W-lane vectors.
// ---------------------------------------------------------------------------

// The vector types of each width, and the conversions between them:
// __builtin_convertvector needs non-dependent types (and GCC drops vector
// attributes from template arguments), hence one specialization per width.
template <int W>
struct VectorTypes;

#define GGUF_VECTOR_TYPES(W_)                                                             \
  template <>                                                                             \
  struct VectorTypes<W_> {                                                                \
    typedef float F __attribute__((vector_size(W_ * sizeof(float))));                     \
    typedef int32_t I __attribute__((vector_size(W_ * sizeof(int32_t))));                 \
    typedef uint32_t U __attribute__((vector_size(W_ * sizeof(uint32_t))));               \
    typedef uint8_t B __attribute__((vector_size(W_)));                                   \
    static GGUF_INLINE F ToFloat(const I& v) { return __builtin_convertvector(v, F); }    \
    static GGUF_INLINE I ToInt(const F& v) { return __builtin_convertvector(v, I); }      \
    static GGUF_INLINE B LowBytes(const U& v) { return __builtin_convertvector(v & 0xFFu, B); } \
  };
GGUF_VECTOR_TYPES(4)
GGUF_VECTOR_TYPES(8)
#undef GGUF_VECTOR_TYPES

template <int W>
struct Lanes : VectorTypes<W> {
  using typename VectorTypes<W>::F;
  using typename VectorTypes<W>::I;
  using typename VectorTypes<W>::U;
  using typename VectorTypes<W>::B;
  using VectorTypes<W>::ToFloat;

  static GGUF_INLINE F Splat(float v) { return F{} + v; }
  static GGUF_INLINE I SplatI(int32_t v) { return I{} + v; }
  static GGUF_INLINE F Abs(const F& v) { return (F)((I)v & 0x7fffffff); }
  static GGUF_INLINE F Max(const F& a, const F& b) { return a > b ? a : b; }
  static GGUF_INLINE F Min(const F& a, const F& b) { return a < b ? a : b; }
  static GGUF_INLINE I Clamp(const I& v, int lo, int hi) {
    const I low = v < lo ? SplatI(lo) : v;
    return low > hi ? SplatI(hi) : low;
  }
  static GGUF_INLINE bool Any(const I& mask) {
    uint64_t words[sizeof(I) / 8];
    std::memcpy(words, &mask, sizeof(words));
    uint64_t any = 0;
    for (uint64_t word : words) any |= word;
    return any != 0;
  }
  static GGUF_INLINE F Load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static GGUF_INLINE void Store(const F& v, float* p) { std::memcpy(p, &v, sizeof(v)); }
  // The low byte of each lane.
  static GGUF_INLINE void StoreBytes(const I& v, uint8_t* p) {
    const B bytes = VectorTypes<W>::LowBytes((U)v);
    std::memcpy(p, &bytes, sizeof(bytes));
  }
  // llama.cpp's nearest_int, lane by lane (the same bits for every input).
  static GGUF_INLINE I NearestInt(const F& x) {
    const F biased = x + 12582912.0f;
    return ((I)biased & 0x007fffff) - 0x00400000;
  }
  // Truncation to int32 as x86-64 does it: INT_MIN out of range and for NaN.
  static GGUF_INLINE I Truncate(const F& x) {
    const I in_range = (x >= -2147483648.0f) & (x < 2147483648.0f);
    const F safe = in_range ? x : F{};
    return in_range ? VectorTypes<W>::ToInt(safe) : SplatI(INT_MIN);
  }
  // C's (int8_t) cast of a float (x86-64): the low byte of the truncation.
  static GGUF_INLINE I TruncToInt8(const F& x) {
    const I low = Truncate(x) & 0xFF;
    return low >= 128 ? low - 256 : low;
  }
  // roundf (half away from zero), as an int32 (INT_MIN where out of range).
  static GGUF_INLINE I RoundHalfAway(const F& x) {
    const I in_range = (x >= -2147483648.0f) & (x < 2147483648.0f);
    const I t = Truncate(x);
    // Exact; 0 where x is integral, NaN or out of range (roundf keeps those).
    const F frac = in_range ? x - ToFloat(t) : F{};
    return t - (frac >= 0.5f) + (frac <= -0.5f);  // masks are -1
  }
  static GGUF_INLINE float HorizontalMax(const F& v) {
    float a[W];
    std::memcpy(a, &v, sizeof(a));
    float m = a[0];
    for (int k = 1; k < W; ++k) m = a[k] > m ? a[k] : m;
    return m;
  }
  static GGUF_INLINE float HorizontalMin(const F& v) {
    float a[W];
    std::memcpy(a, &v, sizeof(a));
    float m = a[0];
    for (int k = 1; k < W; ++k) m = a[k] < m ? a[k] : m;
    return m;
  }
  // Group g of N consecutive values of x into lane g (value i in t[i]);
  // lanes from `groups` on are zero. Through a plain array: element-wise
  // access to a vector register compiles to insert/extract chains.
  template <int N>
  static GGUF_INLINE void Scatter(const float* x, int groups, F* t) {
    float lanes[N][W] = {};
    for (int g = 0; g < groups; ++g) {
      for (int i = 0; i < N; ++i) lanes[i][g] = x[g * N + i];
    }
    std::memcpy(t, lanes, sizeof(lanes));
  }
  template <int N>
  static GGUF_INLINE void Gather(const I* t, int groups, uint8_t* codes) {
    int32_t lanes[N][W];
    std::memcpy(lanes, t, sizeof(lanes));
    for (int g = 0; g < groups; ++g) {
      for (int i = 0; i < N; ++i) codes[g * N + i] = static_cast<uint8_t>(lanes[i][g]);
    }
  }
  static GGUF_INLINE void StoreLanes(const F& v, int groups, float* out) {
    float a[W];
    std::memcpy(a, &v, sizeof(a));
    for (int g = 0; g < groups; ++g) out[g] = a[g];
  }
};

int NearestInt(float x) {
  const float biased = x + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &biased, sizeof(bits));
  return (bits & 0x007fffff) - 0x00400000;
}

GgufHalf ToHalf(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
float FromHalf(GgufHalf h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

template <typename Block>
GGUF_INLINE void Store(const Block& block, uint8_t* out, int64_t index) {
  std::memcpy(out + index * static_cast<int64_t>(sizeof(Block)), &block, sizeof(Block));
}
template <typename Block>
GGUF_INLINE Block Load(const uint8_t* in, int64_t index) {
  Block block;
  std::memcpy(&block, in + index * static_cast<int64_t>(sizeof(Block)), sizeof(Block));
  return block;
}

// ---------------------------------------------------------------------------
// The searches, W groups of N values at once: x[i] holds value i of every
// group. See the reference for the scalar forms.
// ---------------------------------------------------------------------------

// make_qkx2_quants (kQkx3 false) / make_qkx3_quants (true).
template <int W, int N, bool kQkx3, bool kUseMad>
GGUF_INLINE typename Lanes<W>::F MakeQkxLanes(const typename Lanes<W>::F* x,
                                              const typename Lanes<W>::F* w, int nmax, float rmin,
                                              float rdelta, int nstep, typename Lanes<W>::I* L,
                                              typename Lanes<W>::F* the_min) {
  using S = Lanes<W>;
  using F = typename S::F;
  using I = typename S::I;
  const F zero = {};
  F min = x[0];
  F max = x[0];
  F sum_w = w[0];
  F sum_x = sum_w * x[0];
  for (int i = 1; i < N; ++i) {
    min = x[i] < min ? x[i] : min;
    max = x[i] > max ? x[i] : max;
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  min = min > zero ? zero : min;
  const I flat = kQkx3 ? (max <= min) : (max == min);
  const F flat_min = min;
  const F fnmax = S::Splat(static_cast<float>(nmax));
  F iscale = fnmax / (max - min);
  F scale = S::Splat(1.0f) / iscale;
  F best = zero;
  for (int i = 0; i < N; ++i) {
    L[i] = S::Clamp(S::NearestInt(iscale * (x[i] - min)), 0, nmax);
    F diff = scale * S::ToFloat(L[i]) + min - x[i];
    diff = kUseMad ? S::Abs(diff) : diff * diff;
    best += w[i] * diff;
  }
  I laux[N];
  for (int is = 0; is <= nstep; ++is) {
    iscale = S::Splat(rmin + rdelta * is + nmax) / (max - min);
    F sum_l = zero;
    F sum_l2 = zero;
    F sum_xl = zero;
    for (int i = 0; i < N; ++i) {
      I l;
      if (kQkx3) {
        const F v = iscale * (x[i] - min);
        l = v > zero ? S::NearestInt(v < fnmax ? v : fnmax) : I{};
      } else {
        l = S::Clamp(S::NearestInt(iscale * (x[i] - min)), 0, nmax);
      }
      laux[i] = l;
      const F lf = S::ToFloat(l);
      const F wl = w[i] * lf;
      sum_l += wl;
      sum_l2 += wl * lf;
      sum_xl += wl * x[i];
    }
    const F D = sum_w * sum_l2 - sum_l * sum_l;
    const I ok = D > zero;
    if (!S::Any(ok)) continue;
    F this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    F this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    const I positive = this_min > zero;
    this_min = positive ? zero : this_min;
    this_scale = positive ? sum_xl / sum_l2 : this_scale;
    F error = zero;
    for (int i = 0; i < N; ++i) {
      F diff = this_scale * S::ToFloat(laux[i]) + this_min - x[i];
      diff = kUseMad ? S::Abs(diff) : diff * diff;
      error += w[i] * diff;
    }
    const I better = ok & (error < best);
    if (!S::Any(better)) continue;
    for (int i = 0; i < N; ++i) L[i] = better ? laux[i] : L[i];
    best = better ? error : best;
    scale = better ? this_scale : scale;
    min = better ? this_min : min;
  }
  for (int i = 0; i < N; ++i) L[i] = flat ? I{} : L[i];
  *the_min = flat ? -flat_min : -min;
  return flat ? zero : scale;
}

// make_qx_quants, rmse_type 1; w null: x^2. L holds l + nmax.
template <int W, int N>
GGUF_INLINE typename Lanes<W>::F MakeQxLanes(const typename Lanes<W>::F* x,
                                             const typename Lanes<W>::F* w, int nmax,
                                             typename Lanes<W>::I* L) {
  using S = Lanes<W>;
  using F = typename S::F;
  using I = typename S::I;
  const F zero = {};
  F amax = zero;
  F max = zero;
  for (int i = 0; i < N; ++i) {
    const F ax = S::Abs(x[i]);
    const I larger = ax > amax;
    amax = larger ? ax : amax;
    max = larger ? x[i] : max;
  }
  const I all_zero = amax < kGroupMaxEps;
  F iscale = S::Splat(static_cast<float>(-nmax)) / max;
  F sumlx = zero;
  F suml2 = zero;
  for (int i = 0; i < N; ++i) {
    const I l = S::Clamp(S::NearestInt(iscale * x[i]), -nmax, nmax - 1);
    L[i] = l + nmax;
    const F wi = w != nullptr ? w[i] : x[i] * x[i];
    const F lf = S::ToFloat(l);
    sumlx += wi * x[i] * lf;
    suml2 += wi * lf * lf;
  }
  F scale = suml2 != zero ? sumlx / suml2 : zero;
  F best = scale * sumlx;
  I laux[N];
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = S::Splat(-(nmax + 0.1f * is)) / max;
    sumlx = zero;
    suml2 = zero;
    for (int i = 0; i < N; ++i) {
      const I l = S::Clamp(S::NearestInt(iscale * x[i]), -nmax, nmax - 1);
      laux[i] = l;
      const F wi = w != nullptr ? w[i] : x[i] * x[i];
      const F lf = S::ToFloat(l);
      sumlx += wi * x[i] * lf;
      suml2 += wi * lf * lf;
    }
    const I better = (suml2 > zero) & (sumlx * sumlx > best * suml2);
    if (!S::Any(better)) continue;
    const F new_scale = sumlx / suml2;
    for (int i = 0; i < N; ++i) L[i] = better ? laux[i] + nmax : L[i];
    scale = better ? new_scale : scale;
    best = better ? new_scale * sumlx : best;
  }
  for (int i = 0; i < N; ++i) L[i] = all_zero ? I{} : L[i];
  return all_zero ? zero : scale;
}

// make_q3_quants with do_rmse. L holds l + nmax.
template <int W, int N>
GGUF_INLINE typename Lanes<W>::F MakeQ3Lanes(const typename Lanes<W>::F* x, int nmax,
                                             typename Lanes<W>::I* L) {
  using S = Lanes<W>;
  using F = typename S::F;
  using I = typename S::I;
  const F zero = {};
  F amax = zero;
  F max = zero;
  for (int i = 0; i < N; ++i) {
    const F ax = S::Abs(x[i]);
    const I larger = ax > amax;
    amax = larger ? ax : amax;
    max = larger ? x[i] : max;
  }
  const I all_zero = amax < kGroupMaxEps;
  const F iscale = S::Splat(static_cast<float>(-nmax)) / max;
  F sumlx = zero;
  F suml2 = zero;
  for (int i = 0; i < N; ++i) {
    L[i] = S::Clamp(S::NearestInt(iscale * x[i]), -nmax, nmax - 1);
    const F w = x[i] * x[i];
    const F lf = S::ToFloat(L[i]);
    sumlx += w * x[i] * lf;
    suml2 += w * lf * lf;
  }
  I active = ~I{};  // lanes still descending (a lane stops after a pass without change)
  for (int pass = 0; pass < 5; ++pass) {
    I changed = {};
    for (int i = 0; i < N; ++i) {
      const F w = x[i] * x[i];
      const F lf = S::ToFloat(L[i]);
      const F slx = sumlx - w * x[i] * lf;
      const I try_lane = active & (slx > zero);
      if (!S::Any(try_lane)) continue;
      const F sl2 = suml2 - w * lf * lf;
      const I new_l = S::Clamp(S::NearestInt(x[i] * sl2 / slx), -nmax, nmax - 1);
      const F new_lf = S::ToFloat(new_l);
      const F new_slx = slx + w * x[i] * new_lf;
      const F new_sl2 = sl2 + w * new_lf * new_lf;
      const I take = try_lane & (new_l != L[i]) & (new_sl2 > zero) &
                     (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2);
      L[i] = take ? new_l : L[i];
      sumlx = take ? new_slx : sumlx;
      suml2 = take ? new_sl2 : suml2;
      changed |= take;
    }
    active &= changed;
    if (!S::Any(active)) break;
  }
  for (int i = 0; i < N; ++i) L[i] = all_zero ? I{} : L[i] + nmax;
  return all_zero ? zero : (suml2 > zero ? sumlx / suml2 : zero);
}

// The searches over `groups` groups of N consecutive values (x[g * N + i],
// weights alike), W groups at a time: codes into L[g * N + i], scales (and
// mins) into scale[g] (the_min[g]).
template <int W, int N, bool kQkx3, bool kUseMad>
GGUF_INLINE void SearchQkx(const float* x, const float* weights, int groups, int nmax, float rmin,
                           float rdelta, int nstep, uint8_t* L, float* scale, float* the_min) {
  using S = Lanes<W>;
  for (int g = 0; g < groups; g += W) {
    const int count = std::min(W, groups - g);
    typename S::F xt[N];
    typename S::F wt[N];
    typename S::I Lt[N];
    typename S::F mins;
    S::template Scatter<N>(x + g * N, count, xt);
    S::template Scatter<N>(weights + g * N, count, wt);
    const typename S::F scales =
        MakeQkxLanes<W, N, kQkx3, kUseMad>(xt, wt, nmax, rmin, rdelta, nstep, Lt, &mins);
    S::template Gather<N>(Lt, count, L + g * N);
    S::StoreLanes(scales, count, scale + g);
    S::StoreLanes(mins, count, the_min + g);
  }
}

template <int W, int N>
GGUF_INLINE void SearchQx(const float* x, const float* weights, int groups, int nmax, uint8_t* L,
                          float* scale) {
  using S = Lanes<W>;
  for (int g = 0; g < groups; g += W) {
    const int count = std::min(W, groups - g);
    typename S::F xt[N];
    typename S::F wt[N];
    typename S::I Lt[N];
    S::template Scatter<N>(x + g * N, count, xt);
    if (weights != nullptr) S::template Scatter<N>(weights + g * N, count, wt);
    const typename S::F scales = MakeQxLanes<W, N>(xt, weights != nullptr ? wt : nullptr, nmax, Lt);
    S::template Gather<N>(Lt, count, L + g * N);
    S::StoreLanes(scales, count, scale + g);
  }
}

template <int W, int N>
GGUF_INLINE void SearchQ3(const float* x, int groups, int nmax, uint8_t* L, float* scale) {
  using S = Lanes<W>;
  for (int g = 0; g < groups; g += W) {
    const int count = std::min(W, groups - g);
    typename S::F xt[N];
    typename S::I Lt[N];
    S::template Scatter<N>(x + g * N, count, xt);
    const typename S::F scales = MakeQ3Lanes<W, N>(xt, nmax, Lt);
    S::template Gather<N>(Lt, count, L + g * N);
    S::StoreLanes(scales, count, scale + g);
  }
}

// The two small searches over a super-block's scales, once per super-block:
// scalar, as make_qx_quants (rmse_type 1, given weights) and make_qp_quants.
float MakeQxQuantsScalar(int n, int nmax, const float* x, int8_t* L, const float* w) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  int8_t trial[kQK_K];
  float scale = 0.0f;
  float best = 0.0f;
  for (int is = 0; is <= 18; ++is) {  // is = 0 first: the plain -nmax / max
    const int step = is == 0 ? 0 : (is <= 9 ? is - 10 : is - 9);
    const float iscale = step == 0 ? -nmax / max : -(nmax + 0.1f * step) / max;
    float sumlx = 0.0f;
    float suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(-nmax, std::min(nmax - 1, NearestInt(iscale * x[i])));
      trial[i] = static_cast<int8_t>(l + nmax);
      sumlx += w[i] * x[i] * l;
      suml2 += w[i] * l * l;
    }
    if (step == 0) {
      scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
      best = scale * sumlx;
      std::copy(trial, trial + n, L);
    } else if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
      scale = sumlx / suml2;
      best = scale * sumlx;
      std::copy(trial, trial + n, L);
    }
  }
  return scale;
}

float MakeQpQuantsScalar(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float max = 0.0f;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  float iscale = nmax / max;
  {
    const float scale = 1 / iscale;
    float best_mse = 0.0f;
    for (int i = 0; i < n; ++i) {
      const uint8_t l = static_cast<uint8_t>(NearestInt(iscale * x[i]));
      const float diff = x[i] - scale * l;
      best_mse += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
      if (is == 0) continue;
      const float trial_iscale = (0.1f * is + nmax) / max;
      const float trial_scale = 1 / trial_iscale;
      float mse = 0.0f;
      for (int i = 0; i < n; ++i) {
        const int l = std::min(nmax, NearestInt(trial_iscale * x[i]));
        const float diff = x[i] - trial_scale * l;
        mse += w[i] * diff * diff;
      }
      if (mse < best_mse) {
        best_mse = mse;
        iscale = trial_iscale;
      }
    }
  }
  float sumlx = 0.0f;
  float suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, NearestInt(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * l;
    suml2 += w[i] * l * l;
  }
  for (int pass = 0; pass < 5; ++pass) {
    bool changed = false;
    for (int i = 0; i < n; ++i) {
      float slx = sumlx - w[i] * x[i] * L[i];
      float sl2 = suml2 - w[i] * L[i] * L[i];
      if (!(slx > 0.0f && sl2 > 0.0f)) continue;
      const int new_l = std::min(nmax, NearestInt(x[i] * sl2 / slx));
      if (new_l == L[i]) continue;
      slx += w[i] * x[i] * new_l;
      sl2 += w[i] * new_l * new_l;
      if (slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = static_cast<uint8_t>(new_l);
        sumlx = slx;
        suml2 = sl2;
        changed = true;
      }
    }
    if (!changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ---------------------------------------------------------------------------
// Helpers of the k-quants.
// ---------------------------------------------------------------------------

// Codes clamp(nearest_int((x + ml) / dl), lo, hi) + offset (kAddMin false:
// x / dl) for the n values of one sub-block (n a multiple of W).
template <int W, bool kAddMin>
GGUF_INLINE void Requantize(const float* x, int n, float dl, float ml, int lo, int hi, int offset,
                            uint8_t* L) {
  using S = Lanes<W>;
  for (int i = 0; i < n; i += W) {
    typename S::F v = S::Load(x + i);
    if (kAddMin) v = v + ml;
    S::StoreBytes(S::Clamp(S::NearestInt(v / dl), lo, hi) + offset, L + i);
  }
}

float SumOfSquares(const float* x, int n) {
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) sum += x[j] * x[j];
  return sum;
}

// The importance weights of the searches: qw * sqrt(sigma2 + x^2).
GGUF_INLINE void ImportanceWeights(const float* x, const float* qw, float sigma2, int n,
                                   float* weights) {
  for (int j = 0; j < n; ++j) weights[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
}

void Pack2Bit(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t* Lh = L + 128 * h;
    for (int l = 0; l < 32; ++l) {
      qs[32 * h + l] = static_cast<uint8_t>(Lh[l] | (Lh[l + 32] << 2) | (Lh[l + 64] << 4) |
                                            (Lh[l + 96] << 6));
    }
  }
}

void ScaleMinK4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K/Q5_K's 12 bytes from 8 (scale, min) pairs of 6 bits.
void PackScaleMinK4(const uint8_t* ls, const uint8_t* lm, uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    q[j + 4] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    q[j + 8] = static_cast<uint8_t>((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
  }
}

int Q3KScaleFast(const uint8_t* scales, int j) {
  const int low = (scales[j % 8] >> (4 * (j / 8))) & 0xF;
  return low | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4);
}

// ---------------------------------------------------------------------------
// F16, BF16.
// ---------------------------------------------------------------------------

// float -> float16 bits, round to nearest even (the FP16 library's
// branch-free algorithm, which llama.cpp and c10 both use), W at a time.
template <int W>
GGUF_INLINE typename Lanes<W>::U HalfBits(const typename Lanes<W>::F& f) {
  using S = Lanes<W>;
  using F = typename S::F;
  using U = typename S::U;
  const U w = (U)f;
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? (U{} + 0x71000000u) : bias;
  F base = (S::Abs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  base = (F)((bias >> 1) + 0x07800000u) + base;
  const U bits = (U)base;
  const U nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (sign >> 16) | (shl1_w > 0xFF000000u ? (U{} + 0x7E00u) : nonsign);
}

template <int W>
GGUF_INLINE void QuantizeF16Body(const float* x, int64_t n, const float*, uint8_t* out) {
  using S = Lanes<W>;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const typename S::U h = HalfBits<W>(S::Load(x + j));
    uint16_t halves[W];
    for (int k = 0; k < W; ++k) halves[k] = static_cast<uint16_t>(h[k]);
    std::memcpy(out + 2 * j, halves, sizeof(halves));  // little-endian host
  }
  for (; j < n; ++j) {
    const GgufHalf h = ToHalf(x[j]);
    out[2 * j] = static_cast<uint8_t>(h);
    out[2 * j + 1] = static_cast<uint8_t>(h >> 8);
  }
}

GGUF_INLINE void DequantizeF16Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    // float16 -> float32 is exact: rebias a normal's exponent; a subnormal
    // is its mantissa times 2^-24 (one exact product).
    const uint32_t h = static_cast<uint32_t>(in[2 * j] | (in[2 * j + 1] << 8));
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1F;
    const uint32_t mantissa = h & 0x3FF;
    uint32_t bits;
    if (exponent == 0) {
      const float value = static_cast<float>(mantissa) * 0x1.0p-24f;
      std::memcpy(&bits, &value, sizeof(bits));
      bits |= sign;
    } else if (exponent == 0x1F) {  // Inf, or NaN made quiet (as the FP16 library's)
      bits = sign | 0x7F800000u | (mantissa << 13) | (mantissa != 0 ? 0x00400000u : 0u);
    } else {
      bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    std::memcpy(&out[j], &bits, sizeof(bits));
  }
}

template <int W>
GGUF_INLINE void QuantizeBF16Body(const float* x, int64_t n, const float*, uint8_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, &x[j], sizeof(u));
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint16_t b = static_cast<uint16_t>(nan ? ((u >> 16) | 64u)
                                                 : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
    std::memcpy(out + 2 * j, &b, sizeof(b));  // little-endian host
  }
}

GGUF_INLINE void DequantizeBF16Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(in[2 * j] | (in[2 * j + 1] << 8)) << 16;
    std::memcpy(&out[j], &u, sizeof(u));
  }
}

// ---------------------------------------------------------------------------
// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 without importance: one block at a time, its
// 32 values as 32 / W vectors.
// ---------------------------------------------------------------------------

// The first zero of a block that holds one (+0 or -0, as stored).
GGUF_INLINE float FirstZero(const float* xb) {
  for (int j = 0; j < kQK; ++j) {
    if (xb[j] == 0.0f) return xb[j];
  }
  return 0.0f;
}

template <int W>
GGUF_INLINE float AbsMax(const typename Lanes<W>::F* v) {
  using S = Lanes<W>;
  typename S::F m = S::Abs(v[0]);
  for (int k = 1; k < kQK / W; ++k) m = S::Max(m, S::Abs(v[k]));
  return S::HorizontalMax(m);
}

template <int W>
GGUF_INLINE void QuantizeQ8_0Body(const float* x, int64_t n, const float*, uint8_t* out) {
  using S = Lanes<W>;
  for (int64_t b = 0; b < n / kQK; ++b) {
    typename S::F v[kQK / W];
    for (int k = 0; k < kQK / W; ++k) v[k] = S::Load(x + b * kQK + k * W);
    const float d = AbsMax<W>(v) / ((1 << 7) - 1);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ8_0 y;
    y.d = ToHalf(d);
    uint8_t q[kQK];
    for (int k = 0; k < kQK / W; ++k) S::StoreBytes(S::RoundHalfAway(v[k] * id), q + k * W);
    std::memcpy(y.qs, q, sizeof(q));
    Store(y, out, b);
  }
}

// Q4_0/Q5_0: d = the signed value of largest magnitude (the first of equals)
// / -2^(bits-1); codes min(2^bits - 1, (int8)(x / d + 2^(bits-1) + 0.5)).
template <int W, int kBits>
GGUF_INLINE void SymmetricCodes(const float* xb, uint8_t* q, GgufHalf* d_out) {
  using S = Lanes<W>;
  constexpr int kHalfRange = 1 << (kBits - 1);
  typename S::F v[kQK / W];
  for (int k = 0; k < kQK / W; ++k) v[k] = S::Load(xb + k * W);
  // The value of largest magnitude, the first of equals (+0 for a zero
  // block, even when x[0] is -0, as the reference): only a tie between
  // +a and -a needs the scan.
  typename S::F lo = v[0];
  typename S::F hi = v[0];
  for (int k = 1; k < kQK / W; ++k) {
    lo = S::Min(lo, v[k]);
    hi = S::Max(hi, v[k]);
  }
  const float top = S::HorizontalMax(hi);
  const float bottom = S::HorizontalMin(lo);
  float max = 0.0f;
  if (top > -bottom) {
    max = top;
  } else if (-bottom > top) {
    max = bottom;
  } else if (top != 0.0f) {
    for (int j = 0; j < kQK; ++j) {
      if (std::fabs(xb[j]) == top) {
        max = xb[j];
        break;
      }
    }
  }
  const float d = max / -kHalfRange;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  *d_out = ToHalf(d);
  const float offset = kHalfRange + 0.5f;
  for (int k = 0; k < kQK / W; ++k) {
    const typename S::I c = S::TruncToInt8(v[k] * id + offset);
    S::StoreBytes(c > 2 * kHalfRange - 1 ? S::SplatI(2 * kHalfRange - 1) : c, q + k * W);
  }
}

// Q4_1/Q5_1: m = min, codes (x - min) / d + 0.5 truncated; Q4_1 as
// MIN(15, (int8_t)...), Q5_1 as (uint8_t)... without a clamp.
template <int W, int kBits>
GGUF_INLINE void AffineCodes(const float* xb, uint8_t* q, GgufHalf* d_out, GgufHalf* m_out) {
  using S = Lanes<W>;
  typename S::F v[kQK / W];
  for (int k = 0; k < kQK / W; ++k) v[k] = S::Load(xb + k * W);
  typename S::F lo = v[0];
  typename S::F hi = v[0];
  for (int k = 1; k < kQK / W; ++k) {
    lo = S::Min(lo, v[k]);
    hi = S::Max(hi, v[k]);
  }
  float min = S::HorizontalMin(lo);
  float max = S::HorizontalMax(hi);
  // The reference keeps the first of equal values; only zeros differ (+0 / -0).
  if (min == 0.0f) min = FirstZero(xb);
  if (max == 0.0f) max = FirstZero(xb);
  const float d = (max - min) / ((1 << kBits) - 1);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  *d_out = ToHalf(d);
  *m_out = ToHalf(min);
  for (int k = 0; k < kQK / W; ++k) {
    const typename S::F t = (v[k] - min) * id + 0.5f;
    if (kBits == 4) {
      const typename S::I c = S::TruncToInt8(t);
      S::StoreBytes(c > 15 ? S::SplatI(15) : c, q + k * W);
    } else {
      S::StoreBytes(S::Truncate(t), q + k * W);
    }
  }
}

template <typename Block>
GGUF_INLINE void PackNibbles(const uint8_t* q, Block& y) {
  for (int j = 0; j < 16; ++j) y.qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
}

template <typename Block>
GGUF_INLINE void PackFiveBits(const uint8_t* q, Block& y) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    y.qs[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
    qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    qh |= static_cast<uint32_t>((q[j + 16] >> 4) & 1) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) y.qh[k] = static_cast<uint8_t>(qh >> (8 * k));
}

// ---------------------------------------------------------------------------
// Q4_0, Q4_1, Q5_0, Q5_1 with importance: the blocks of a row in the lanes.
// ---------------------------------------------------------------------------

// kAffine false: Q4_0/Q5_0 (make_qx_quants); true: Q4_1/Q5_1
// (make_qkx3_quants). sigma2 is the row's mean square.
template <int W, int kBits, bool kAffine, typename Block>
GGUF_INLINE void QuantizeLegacyWeighted(const float* x, int64_t n, const float* importance,
                                        uint8_t* out) {
  constexpr int kBatch = 64;  // blocks per batch
  const float sigma2 = SumOfSquares(x, static_cast<int>(n)) / n;
  const int64_t blocks = n / kQK;
  for (int64_t b = 0; b < blocks; b += kBatch) {
    const int count = static_cast<int>(std::min<int64_t>(kBatch, blocks - b));
    const float* xb = x + b * kQK;
    float weights[kBatch * kQK];
    ImportanceWeights(xb, importance + b * kQK, sigma2, count * kQK, weights);
    uint8_t L[kBatch * kQK];
    float scale[kBatch];
    float the_min[kBatch];
    if (kAffine) {
      SearchQkx<W, kQK, true, false>(xb, weights, count, (1 << kBits) - 1, -0.9f, 0.05f, 36, L,
                                     scale, the_min);
    } else {
      SearchQx<W, kQK>(xb, weights, count, 1 << (kBits - 1), L, scale);
    }
    for (int g = 0; g < count; ++g) {
      Block y;
      y.d = ToHalf(scale[g]);
      if constexpr (kAffine) y.m = ToHalf(-the_min[g]);
      if constexpr (kBits == 4) {
        PackNibbles(L + g * kQK, y);
      } else {
        PackFiveBits(L + g * kQK, y);
      }
      Store(y, out, b + g);
    }
  }
}

template <int W>
GGUF_INLINE void QuantizeQ4_0Body(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  if (importance != nullptr) {
    QuantizeLegacyWeighted<W, 4, false, BlockQ4_0>(x, n, importance, out);
    return;
  }
  for (int64_t b = 0; b < n / kQK; ++b) {
    BlockQ4_0 y;
    uint8_t q[kQK];
    SymmetricCodes<W, 4>(x + b * kQK, q, &y.d);
    PackNibbles(q, y);
    Store(y, out, b);
  }
}

template <int W>
GGUF_INLINE void QuantizeQ5_0Body(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  if (importance != nullptr) {
    QuantizeLegacyWeighted<W, 5, false, BlockQ5_0>(x, n, importance, out);
    return;
  }
  for (int64_t b = 0; b < n / kQK; ++b) {
    BlockQ5_0 y;
    uint8_t q[kQK];
    SymmetricCodes<W, 5>(x + b * kQK, q, &y.d);
    PackFiveBits(q, y);
    Store(y, out, b);
  }
}

template <int W>
GGUF_INLINE void QuantizeQ4_1Body(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  if (importance != nullptr) {
    QuantizeLegacyWeighted<W, 4, true, BlockQ4_1>(x, n, importance, out);
    return;
  }
  for (int64_t b = 0; b < n / kQK; ++b) {
    BlockQ4_1 y;
    uint8_t q[kQK];
    AffineCodes<W, 4>(x + b * kQK, q, &y.d, &y.m);
    PackNibbles(q, y);
    Store(y, out, b);
  }
}

template <int W>
GGUF_INLINE void QuantizeQ5_1Body(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  if (importance != nullptr) {
    QuantizeLegacyWeighted<W, 5, true, BlockQ5_1>(x, n, importance, out);
    return;
  }
  for (int64_t b = 0; b < n / kQK; ++b) {
    BlockQ5_1 y;
    uint8_t q[kQK];
    AffineCodes<W, 5>(x + b * kQK, q, &y.d, &y.m);
    PackFiveBits(q, y);
    Store(y, out, b);
  }
}

// ---------------------------------------------------------------------------
// Q2_K, Q3_K, Q6_K: 16 sub-blocks of 16 per super-block.
// ---------------------------------------------------------------------------

template <int W>
GGUF_INLINE void QuantizeQ2_KBody(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    float weights[kQK_K];
    uint8_t L[kQK_K];
    float scales[16];
    float mins[16];
    BlockQ2_K y;
    if (importance == nullptr) {
      for (int j = 0; j < kQK_K; ++j) weights[j] = std::fabs(xb[j]);
      SearchQkx<W, 16, false, true>(xb, weights, 16, 3, -0.5f, 0.1f, 15, L, scales, mins);
      float max_scale = 0.0f;
      float max_min = 0.0f;
      for (int s = 0; s < 16; ++s) {
        if (scales[s] > max_scale) max_scale = scales[s];
        if (mins[s] > max_min) max_min = mins[s];
      }
      int sc[16] = {};
      if (max_scale > 0.0f) {
        const float iscale = 15.0f / max_scale;
        for (int s = 0; s < 16; ++s) sc[s] = NearestInt(iscale * scales[s]) & 0xFF;
      }
      if (max_min > 0.0f) {
        const float iscale = 15.0f / max_min;
        for (int s = 0; s < 16; ++s) sc[s] |= NearestInt(iscale * mins[s]) << 4;
      }
      for (int s = 0; s < 16; ++s) y.scales[s] = static_cast<uint8_t>(sc[s]);
      y.d = ToHalf(max_scale > 0.0f ? max_scale / 15.0f : 0.0f);
      y.dmin = ToHalf(max_min > 0.0f ? max_min / 15.0f : 0.0f);
    } else {
      const float sigma2 = SumOfSquares(xb, kQK_K) / kQK_K;
      ImportanceWeights(xb, importance + b * kQK_K, sigma2, kQK_K, weights);
      float sw[16];
      for (int s = 0; s < 16; ++s) {
        sw[s] = 0.0f;
        for (int l = 0; l < 16; ++l) sw[s] += weights[16 * s + l];
      }
      SearchQkx<W, 16, true, false>(xb, weights, 16, 3, -0.9f, 0.05f, 36, L, scales, mins);
      uint8_t Ls[16];
      uint8_t Lm[16];
      y.d = ToHalf(MakeQpQuantsScalar(16, 15, scales, Ls, sw));
      y.dmin = ToHalf(MakeQpQuantsScalar(16, 15, mins, Lm, sw));
      for (int s = 0; s < 16; ++s) y.scales[s] = static_cast<uint8_t>(Ls[s] | (Lm[s] << 4));
    }
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    for (int s = 0; s < 16; ++s) {
      const float dl = d * (y.scales[s] & 0xF);
      if (dl == 0.0f) continue;  // keeps the search's codes
      Requantize<W, true>(xb + 16 * s, 16, dl, dmin * (y.scales[s] >> 4), 0, 3, 0, L + 16 * s);
    }
    Pack2Bit(L, y.qs);
    Store(y, out, b);
  }
}

template <int W>
GGUF_INLINE void QuantizeQ3_KBody(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    uint8_t L[kQK_K];
    float scales[16];
    BlockQ3_K y;
    int packed[16] = {};  // the 6-bit scales, 32 meaning zero
    if (importance == nullptr) {
      SearchQ3<W, 16>(xb, 16, 4, L, scales);
      float amax = 0.0f;
      float max_scale = 0.0f;
      for (int s = 0; s < 16; ++s) {
        if (std::fabs(scales[s]) > amax) {
          amax = std::fabs(scales[s]);
          max_scale = scales[s];
        }
      }
      if (max_scale != 0.0f) {
        const float iscale = -32.0f / max_scale;
        for (int s = 0; s < 16; ++s) {
          const int l = static_cast<int8_t>(NearestInt(iscale * scales[s]));
          packed[s] = std::max(-32, std::min(31, l)) + 32;
        }
        y.d = ToHalf(1 / iscale);
      } else {
        y.d = ToHalf(0.0f);
      }
    } else {
      const float sigma2 = 2 * SumOfSquares(xb, kQK_K) / kQK_K;
      float weights[kQK_K];
      ImportanceWeights(xb, importance + b * kQK_K, sigma2, kQK_K, weights);
      float sw[16];
      for (int s = 0; s < 16; ++s) {
        sw[s] = 0.0f;
        for (int l = 0; l < 16; ++l) sw[s] += weights[16 * s + l];
      }
      SearchQx<W, 16>(xb, weights, 16, 4, L, scales);
      int8_t Ls[16];
      y.d = ToHalf(MakeQxQuantsScalar(16, 32, scales, Ls, sw));
      for (int s = 0; s < 16; ++s) packed[s] = Ls[s];
    }
    std::memset(y.scales, 0, sizeof(y.scales));
    for (int s = 0; s < 16; ++s) {
      y.scales[s % 8] |= static_cast<uint8_t>((packed[s] & 0xF) << (4 * (s / 8)));
      y.scales[8 + s % 4] |= static_cast<uint8_t>(((packed[s] >> 4) & 3) << (2 * (s / 4)));
    }
    const float d = FromHalf(y.d);
    for (int s = 0; s < 16; ++s) {
      const float dl = d * (Q3KScaleFast(y.scales, s) - 32);
      if (dl == 0.0f) continue;
      Requantize<W, false>(xb + 16 * s, 16, dl, 0.0f, -4, 3, 4, L + 16 * s);
    }
    std::memset(y.hmask, 0, sizeof(y.hmask));
    for (int j = 0; j < kQK_K; ++j) {
      if (L[j] > 3) {
        y.hmask[j % 32] |= static_cast<uint8_t>(1 << (j / 32));
        L[j] -= 4;
      }
    }
    Pack2Bit(L, y.qs);
    Store(y, out, b);
  }
}

template <int W>
GGUF_INLINE void QuantizeQ6_KBody(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    uint8_t L[kQK_K];
    float scales[16];
    SearchQx<W, 16>(xb, importance != nullptr ? importance + b * kQK_K : nullptr, 16, 32, L,
                    scales);
    float max_scale = 0.0f;
    float max_abs_scale = 0.0f;
    for (int s = 0; s < 16; ++s) {
      if (std::fabs(scales[s]) > max_abs_scale) {
        max_abs_scale = std::fabs(scales[s]);
        max_scale = scales[s];
      }
    }
    BlockQ6_K y;
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&y, 0, sizeof(y));
      Store(y, out, b);
      continue;
    }
    const float iscale = -128.0f / max_scale;
    y.d = ToHalf(1 / iscale);
    const float d = FromHalf(y.d);
    for (int s = 0; s < 16; ++s) {
      y.scales[s] = static_cast<int8_t>(std::min(127, NearestInt(iscale * scales[s])));
      const float dl = d * y.scales[s];
      if (dl == 0.0f) continue;
      Requantize<W, false>(xb + 16 * s, 16, dl, 0.0f, -32, 31, 32, L + 16 * s);
    }
    for (int h = 0; h < 2; ++h) {
      const uint8_t* c = L + 128 * h;
      for (int l = 0; l < 32; ++l) {
        y.ql[64 * h + l] = static_cast<uint8_t>((c[l] & 0xF) | ((c[l + 64] & 0xF) << 4));
        y.ql[64 * h + 32 + l] = static_cast<uint8_t>((c[l + 32] & 0xF) | ((c[l + 96] & 0xF) << 4));
        y.qh[32 * h + l] = static_cast<uint8_t>((c[l] >> 4) | ((c[l + 32] >> 4) << 2) |
                                                ((c[l + 64] >> 4) << 4) | ((c[l + 96] >> 4) << 6));
      }
    }
    Store(y, out, b);
  }
}

// ---------------------------------------------------------------------------
// Q4_K, Q5_K: 8 sub-blocks of 32 per super-block.
// ---------------------------------------------------------------------------

template <int W, int kNmax, typename Block>
GGUF_INLINE void QuantizeK4Body(const float* x, int64_t n, const float* importance, uint8_t* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    float weights[kQK_K];
    uint8_t L[kQK_K];
    float scales[8];
    float mins[8];
    uint8_t ls[8];
    uint8_t lm[8];
    Block y;
    if (importance == nullptr) {
      for (int j = 0; j < 8; ++j) {
        const float av_x = std::sqrt(SumOfSquares(xb + 32 * j, 32) / 32);
        for (int l = 0; l < 32; ++l) weights[32 * j + l] = av_x + std::fabs(xb[32 * j + l]);
      }
      constexpr float kRmin = kNmax == 15 ? -1.0f : -0.5f;
      constexpr int kSteps = kNmax == 15 ? 20 : 15;
      SearchQkx<W, 32, false, false>(xb, weights, 8, kNmax, kRmin, 0.1f, kSteps, L, scales, mins);
      float max_scale = 0.0f;
      float max_min = 0.0f;
      for (int j = 0; j < 8; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
      }
      const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
      const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
      for (int j = 0; j < 8; ++j) {
        ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(NearestInt(inv_scale * scales[j])));
        lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(NearestInt(inv_min * mins[j])));
      }
      y.d = ToHalf(max_scale / 63.0f);
      y.dmin = ToHalf(max_min / 63.0f);
    } else {
      const float sigma2 = 2 * SumOfSquares(xb, kQK_K) / kQK_K;
      ImportanceWeights(xb, importance + b * kQK_K, sigma2, kQK_K, weights);
      float sw[8];
      for (int j = 0; j < 8; ++j) {
        sw[j] = 0.0f;
        for (int l = 0; l < 32; ++l) sw[j] += weights[32 * j + l];
      }
      SearchQkx<W, 32, true, false>(xb, weights, 8, kNmax, -0.9f, 0.05f, 36, L, scales, mins);
      y.d = ToHalf(MakeQpQuantsScalar(8, 63, scales, ls, sw));
      y.dmin = ToHalf(MakeQpQuantsScalar(8, 63, mins, lm, sw));
      if (kNmax == 31) {  // quantize_row_q5_K_impl clamps; q4_K_impl does not
        for (int j = 0; j < 8; ++j) {
          ls[j] = std::min<uint8_t>(63, ls[j]);
          lm[j] = std::min<uint8_t>(63, lm[j]);
        }
      }
    }
    PackScaleMinK4(ls, lm, y.scales);
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    for (int j = 0; j < 8; ++j) {
      int sc;
      int m;
      ScaleMinK4(j, y.scales, &sc, &m);
      const float dl = d * sc;
      if (dl == 0.0f) continue;
      Requantize<W, true>(xb + 32 * j, 32, dl, dmin * m, 0, kNmax, 0, L + 32 * j);
    }
    if constexpr (kNmax == 31) {
      std::memset(y.qh, 0, sizeof(y.qh));
      for (int q = 0; q < 4; ++q) {
        for (int l = 0; l < 32; ++l) {
          const int l1 = L[64 * q + l];
          const int l2 = L[64 * q + 32 + l];
          y.qh[l] |= static_cast<uint8_t>(((l1 >> 4) << (2 * q)) | ((l2 >> 4) << (2 * q + 1)));
          y.qs[32 * q + l] = static_cast<uint8_t>((l1 & 0xF) | ((l2 & 0xF) << 4));
        }
      }
    } else {
      for (int q = 0; q < 4; ++q) {
        for (int l = 0; l < 32; ++l) {
          y.qs[32 * q + l] = static_cast<uint8_t>(L[64 * q + l] | (L[64 * q + 32 + l] << 4));
        }
      }
    }
    Store(y, out, b);
  }
}

template <int W>
GGUF_INLINE void QuantizeQ4_KBody(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  QuantizeK4Body<W, 15, BlockQ4_K>(x, n, importance, out);
}

template <int W>
GGUF_INLINE void QuantizeQ5_KBody(const float* x, int64_t n, const float* importance,
                                  uint8_t* out) {
  QuantizeK4Body<W, 31, BlockQ5_K>(x, n, importance, out);
}

// ---------------------------------------------------------------------------
// Dequantizers: the reference formulas, written to vectorize.
// ---------------------------------------------------------------------------

GGUF_INLINE void DequantizeQ8_0Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ8_0 y = Load<BlockQ8_0>(in, b);
    const float d = FromHalf(y.d);
    float* o = out + b * kQK;
    for (int j = 0; j < kQK; ++j) o[j] = y.qs[j] * d;
  }
}

GGUF_INLINE void DequantizeQ4_0Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ4_0 y = Load<BlockQ4_0>(in, b);
    const float d = FromHalf(y.d);
    float* o = out + b * kQK;
    for (int j = 0; j < 16; ++j) {
      o[j] = ((y.qs[j] & 0xF) - 8) * d;
      o[j + 16] = ((y.qs[j] >> 4) - 8) * d;
    }
  }
}

GGUF_INLINE void DequantizeQ4_1Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ4_1 y = Load<BlockQ4_1>(in, b);
    const float d = FromHalf(y.d);
    const float m = FromHalf(y.m);
    float* o = out + b * kQK;
    for (int j = 0; j < 16; ++j) {
      o[j] = (y.qs[j] & 0xF) * d + m;
      o[j + 16] = (y.qs[j] >> 4) * d + m;
    }
  }
}

template <typename Block>
GGUF_INLINE void FiveBitCodes(const Block& y, int* q) {
  const uint32_t qh = static_cast<uint32_t>(y.qh[0]) | (static_cast<uint32_t>(y.qh[1]) << 8) |
                      (static_cast<uint32_t>(y.qh[2]) << 16) |
                      (static_cast<uint32_t>(y.qh[3]) << 24);
  for (int j = 0; j < 16; ++j) {
    q[j] = (y.qs[j] & 0xF) | static_cast<int>(((qh >> j) & 1) << 4);
    q[j + 16] = (y.qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1) << 4);
  }
}

GGUF_INLINE void DequantizeQ5_0Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ5_0 y = Load<BlockQ5_0>(in, b);
    const float d = FromHalf(y.d);
    int q[kQK];
    FiveBitCodes(y, q);
    float* o = out + b * kQK;
    for (int j = 0; j < kQK; ++j) o[j] = (q[j] - 16) * d;
  }
}

GGUF_INLINE void DequantizeQ5_1Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK; ++b) {
    const BlockQ5_1 y = Load<BlockQ5_1>(in, b);
    const float d = FromHalf(y.d);
    const float m = FromHalf(y.m);
    int q[kQK];
    FiveBitCodes(y, q);
    float* o = out + b * kQK;
    for (int j = 0; j < kQK; ++j) o[j] = q[j] * d + m;
  }
}

GGUF_INLINE void DequantizeQ2_KBody(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ2_K y = Load<BlockQ2_K>(in, b);
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    float* o = out + b * kQK_K;
    for (int j = 0; j < kQK_K; j += 16) {  // sub-block j / 16
      const int h = j / 128;
      const int s = (j / 32) % 4;
      const int l0 = j % 32;
      const float dl = d * (y.scales[j / 16] & 0xF);
      const float ml = dmin * (y.scales[j / 16] >> 4);
      for (int l = 0; l < 16; ++l) {
        o[j + l] = dl * ((y.qs[32 * h + l0 + l] >> (2 * s)) & 3) - ml;
      }
    }
  }
}

GGUF_INLINE void DequantizeQ3_KBody(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ3_K y = Load<BlockQ3_K>(in, b);
    const float d = FromHalf(y.d);
    float* o = out + b * kQK_K;
    for (int j = 0; j < kQK_K; j += 16) {
      const int h = j / 128;
      const int s = (j / 32) % 4;
      const int l0 = j % 32;
      const float dl = d * (Q3KScaleFast(y.scales, j / 16) - 32);
      const int bit = j / 32;
      for (int l = 0; l < 16; ++l) {
        const int low = (y.qs[32 * h + l0 + l] >> (2 * s)) & 3;
        const int high = (y.hmask[l0 + l] >> bit) & 1;
        o[j + l] = dl * (low - 4 + 4 * high);
      }
    }
  }
}

template <typename Block, bool kHighBit>
GGUF_INLINE void DequantizeK4Body(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const Block y = Load<Block>(in, b);
    const float d = FromHalf(y.d);
    const float dmin = FromHalf(y.dmin);
    float* o = out + b * kQK_K;
    for (int j = 0; j < 8; ++j) {  // sub-block j: nibble j % 2 of qs[32 (j / 2) + l]
      int sc;
      int m;
      ScaleMinK4(j, y.scales, &sc, &m);
      const float dl = d * sc;
      const float ml = dmin * m;
      const uint8_t* qs = y.qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int l = 0; l < 32; ++l) {
        int q = (qs[l] >> shift) & 0xF;
        if constexpr (kHighBit) q |= ((y.qh[l] >> j) & 1) << 4;
        o[32 * j + l] = dl * q - ml;
      }
    }
  }
}

GGUF_INLINE void DequantizeQ4_KBody(const uint8_t* in, int64_t n, float* out) {
  DequantizeK4Body<BlockQ4_K, false>(in, n, out);
}

GGUF_INLINE void DequantizeQ5_KBody(const uint8_t* in, int64_t n, float* out) {
  DequantizeK4Body<BlockQ5_K, true>(in, n, out);
}

GGUF_INLINE void DequantizeQ6_KBody(const uint8_t* in, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const BlockQ6_K y = Load<BlockQ6_K>(in, b);
    const float d = FromHalf(y.d);
    float* o = out + b * kQK_K;
    for (int j = 0; j < kQK_K; j += 32) {  // 32 elements: two sub-blocks of 16
      const int h = j / 128;
      const int s = (j / 32) % 4;
      const uint8_t* ql = y.ql + 64 * h + 32 * (s % 2);
      const uint8_t* qh = y.qh + 32 * h;
      const int low_shift = 4 * (s / 2);
      const float d0 = d * y.scales[j / 16];
      const float d1 = d * y.scales[j / 16 + 1];
      for (int l = 0; l < 32; ++l) {
        const int q = (((ql[l] >> low_shift) & 0xF) | (((qh[l] >> (2 * s)) & 3) << 4)) - 32;
        o[j + l] = (l < 16 ? d0 : d1) * q;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The row functions: an AVX2 and a baseline variant of each, picked once.
// ---------------------------------------------------------------------------

bool HasAvx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has_avx2;
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GGUF_AVX2 __attribute__((target("avx2")))
#else
#define GGUF_AVX2
#endif

// An F16 or BF16 row as float32, exactly. F16 goes through the F16C
// instruction where the CPU has it: a scalar conversion per element costs
// as much as Q8_0's whole encoding.
void HalfRowToFloatScalar(const c10::Half* in, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(in[j]);
}
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) void HalfRowToFloatF16c(const c10::Half* in, int64_t n,
                                                              float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j));
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
  }
  HalfRowToFloatScalar(in + j, n - j, out + j);
}
bool HasF16c() {
  static const bool has_f16c = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("f16c") != 0;
  }();
  return has_f16c;
}
#endif
void HalfRowToFloat(const c10::Half* in, int64_t n, float* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (HasF16c()) return HalfRowToFloatF16c(in, n, out);
#endif
  HalfRowToFloatScalar(in, n, out);
}
void BFloat16RowToFloat(const c10::BFloat16* in, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(in[j].x) << 16;
    std::memcpy(&out[j], &bits, sizeof(bits));
  }
}

#define GGUF_QUANTIZE_ROW(Name, Body)                                                         \
  GGUF_AVX2 void Name##Avx2(const float* x, int64_t n, const float* importance, uint8_t* out) { \
    Body<8>(x, n, importance, out);                                                           \
  }                                                                                           \
  void Name##Sse2(const float* x, int64_t n, const float* importance, uint8_t* out) {         \
    Body<4>(x, n, importance, out);                                                           \
  }                                                                                           \
  void Name(const float* x, int64_t n, const float* importance, uint8_t* out) {               \
    (HasAvx2() ? Name##Avx2 : Name##Sse2)(x, n, importance, out);                             \
  }
#define GGUF_DEQUANTIZE_ROW(Name, Body)                                                      \
  GGUF_AVX2 void Name##Avx2(const uint8_t* in, int64_t n, float* out) { Body(in, n, out); } \
  void Name##Sse2(const uint8_t* in, int64_t n, float* out) { Body(in, n, out); }           \
  void Name(const uint8_t* in, int64_t n, float* out) {                                      \
    (HasAvx2() ? Name##Avx2 : Name##Sse2)(in, n, out);                                       \
  }

void QuantizeRowF32(const float* x, int64_t n, const float*, uint8_t* out) {
  std::memcpy(out, x, n * sizeof(float));
}
void DequantizeRowF32(const uint8_t* in, int64_t n, float* out) {
  std::memcpy(out, in, n * sizeof(float));
}
GGUF_QUANTIZE_ROW(QuantizeRowF16, QuantizeF16Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowF16, DequantizeF16Body)
GGUF_QUANTIZE_ROW(QuantizeRowBF16, QuantizeBF16Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowBF16, DequantizeBF16Body)
GGUF_QUANTIZE_ROW(QuantizeRowQ8_0, QuantizeQ8_0Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ8_0, DequantizeQ8_0Body)
GGUF_QUANTIZE_ROW(QuantizeRowQ4_0, QuantizeQ4_0Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ4_0, DequantizeQ4_0Body)
GGUF_QUANTIZE_ROW(QuantizeRowQ4_1, QuantizeQ4_1Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ4_1, DequantizeQ4_1Body)
GGUF_QUANTIZE_ROW(QuantizeRowQ5_0, QuantizeQ5_0Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ5_0, DequantizeQ5_0Body)
GGUF_QUANTIZE_ROW(QuantizeRowQ5_1, QuantizeQ5_1Body)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ5_1, DequantizeQ5_1Body)
GGUF_QUANTIZE_ROW(QuantizeRowQ2_K, QuantizeQ2_KBody)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ2_K, DequantizeQ2_KBody)
GGUF_QUANTIZE_ROW(QuantizeRowQ3_K, QuantizeQ3_KBody)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ3_K, DequantizeQ3_KBody)
GGUF_QUANTIZE_ROW(QuantizeRowQ4_K, QuantizeQ4_KBody)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ4_K, DequantizeQ4_KBody)
GGUF_QUANTIZE_ROW(QuantizeRowQ5_K, QuantizeQ5_KBody)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ5_K, DequantizeQ5_KBody)
GGUF_QUANTIZE_ROW(QuantizeRowQ6_K, QuantizeQ6_KBody)
GGUF_DEQUANTIZE_ROW(DequantizeRowQ6_K, DequantizeQ6_KBody)
#undef GGUF_QUANTIZE_ROW
#undef GGUF_DEQUANTIZE_ROW

template <typename Block>
constexpr GgufQuantizer Row(GgufType type, bool uses_importance, GgufQuantizeRowFn quantize,
                            GgufDequantizeRowFn dequantize, GgufQuantizeRowFn quantize_reference,
                            GgufDequantizeRowFn dequantize_reference) {
  return GgufQuantizer{type,     Block::kElements, sizeof(Block),      uses_importance,
                       quantize, dequantize,       quantize_reference, dequantize_reference};
}

// The unquantized types' "blocks": one value.
struct F32Value {
  static constexpr int kElements = 1;
  float value;
};
struct HalfValue {
  static constexpr int kElements = 1;
  GgufHalf value;
};

// The table. A new format is a block struct in the header, its two pairs of
// row functions, and a row here.
const GgufQuantizer kQuantizers[] = {
    Row<F32Value>(GgufType::kF32, false, QuantizeRowF32, DequantizeRowF32,
                  QuantizeRowF32Reference, DequantizeRowF32Reference),
    Row<HalfValue>(GgufType::kF16, false, QuantizeRowF16, DequantizeRowF16,
                   QuantizeRowF16Reference, DequantizeRowF16Reference),
    Row<HalfValue>(GgufType::kBF16, false, QuantizeRowBF16, DequantizeRowBF16,
                   QuantizeRowBF16Reference, DequantizeRowBF16Reference),
    Row<BlockQ8_0>(GgufType::kQ8_0, false, QuantizeRowQ8_0, DequantizeRowQ8_0,
                   QuantizeRowQ8_0Reference, DequantizeRowQ8_0Reference),
    Row<BlockQ4_0>(GgufType::kQ4_0, true, QuantizeRowQ4_0, DequantizeRowQ4_0,
                   QuantizeRowQ4_0Reference, DequantizeRowQ4_0Reference),
    Row<BlockQ4_1>(GgufType::kQ4_1, true, QuantizeRowQ4_1, DequantizeRowQ4_1,
                   QuantizeRowQ4_1Reference, DequantizeRowQ4_1Reference),
    Row<BlockQ5_0>(GgufType::kQ5_0, true, QuantizeRowQ5_0, DequantizeRowQ5_0,
                   QuantizeRowQ5_0Reference, DequantizeRowQ5_0Reference),
    Row<BlockQ5_1>(GgufType::kQ5_1, true, QuantizeRowQ5_1, DequantizeRowQ5_1,
                   QuantizeRowQ5_1Reference, DequantizeRowQ5_1Reference),
    Row<BlockQ2_K>(GgufType::kQ2_K, true, QuantizeRowQ2_K, DequantizeRowQ2_K,
                   QuantizeRowQ2_KReference, DequantizeRowQ2_KReference),
    Row<BlockQ3_K>(GgufType::kQ3_K, true, QuantizeRowQ3_K, DequantizeRowQ3_K,
                   QuantizeRowQ3_KReference, DequantizeRowQ3_KReference),
    Row<BlockQ4_K>(GgufType::kQ4_K, true, QuantizeRowQ4_K, DequantizeRowQ4_K,
                   QuantizeRowQ4_KReference, DequantizeRowQ4_KReference),
    Row<BlockQ5_K>(GgufType::kQ5_K, true, QuantizeRowQ5_K, DequantizeRowQ5_K,
                   QuantizeRowQ5_KReference, DequantizeRowQ5_KReference),
    Row<BlockQ6_K>(GgufType::kQ6_K, true, QuantizeRowQ6_K, DequantizeRowQ6_K,
                   QuantizeRowQ6_KReference, DequantizeRowQ6_KReference),
};

// ---------------------------------------------------------------------------
// Tensors.
// ---------------------------------------------------------------------------

std::string TypeName(GgufType type) {
  const std::optional<GgufTypeInfo> info = FindGgufType(static_cast<uint32_t>(type));
  return info ? std::string(info->name) : absl::StrCat("type id ", static_cast<uint32_t>(type));
}

std::string Describe(absl::string_view name, absl::Span<const int64_t> shape, GgufType type) {
  return absl::StrCat("tensor '", name, "' [", absl::StrJoin(shape, ", "), "] as ",
                      TypeName(type));
}

// True when all n values are finite (no NaN, no Inf).
bool AllFinite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &x[j], sizeof(bits));
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// The bits of the largest |x| of a row; at least kNonFiniteBits when the
// row holds an Inf or a NaN. (Non-negative floats order as their bits.)
constexpr uint32_t kNonFiniteBits = 0x7f800000u;
uint32_t MaxAbsBits(const float* x, int64_t n) {
  uint32_t top = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &x[j], sizeof(bits));
    top = std::max(top, bits & 0x7fffffffu);
  }
  return top;
}

// Every value a block stores as float16 (scales, minimums, super-block
// scales) is within a small multiple (64 at most, for k-quant minimums) of
// the block's largest |x|, so below this no row can overflow float16 and
// the dequantize-and-check pass is skipped.
constexpr float kOverflowPossibleAbove = 256.0f;

void AtomicMin(std::atomic<int64_t>& target, int64_t value) {
  int64_t current = target.load();
  while (value < current && !target.compare_exchange_weak(current, value)) {
  }
}

// Elements per parallel work item: rows are independent, but tiny ones are
// not worth a task each.
constexpr int64_t kGrainElements = int64_t{1} << 16;

}  // namespace

absl::Span<const GgufQuantizer> GgufQuantizers() { return kQuantizers; }

const GgufQuantizer* FindGgufQuantizer(GgufType type) {
  for (const GgufQuantizer& quantizer : kQuantizers) {
    if (quantizer.type == type) return &quantizer;
  }
  return nullptr;
}

absl::StatusOr<GgufTensorLayout> GgufLayoutOf(GgufType type, const std::vector<int64_t>& shape,
                                              absl::string_view name) {
  const GgufQuantizer* quantizer = FindGgufQuantizer(type);
  if (quantizer == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(Describe(name, shape, type), ": no GGUF quantizer for this type"));
  }
  if (shape.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Describe(name, shape, type), ": needs at least one dimension"));
  }
  int64_t rows = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(Describe(name, shape, type), ": dimension ", i, " is ", shape[i],
                       " (GGUF tensors are not empty)"));
    }
    if (i + 1 < shape.size() && __builtin_mul_overflow(rows, shape[i], &rows)) {
      return absl::InvalidArgumentError(absl::StrCat(Describe(name, shape, type), ": too large"));
    }
  }
  GgufTensorLayout layout;
  layout.rows = rows;
  layout.row_elements = shape.back();
  if (layout.row_elements % quantizer->block_elements != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        Describe(name, shape, type), ": row length ", layout.row_elements,
        " is not a multiple of the block size ", quantizer->block_elements));
  }
  layout.row_bytes = layout.row_elements / quantizer->block_elements * quantizer->block_bytes;
  if (__builtin_mul_overflow(layout.rows, layout.row_bytes, &layout.bytes) ||
      layout.bytes > (int64_t{1} << 62)) {
    return absl::InvalidArgumentError(absl::StrCat(Describe(name, shape, type), ": too large"));
  }
  return layout;
}

absl::StatusOr<std::string> QuantizeGgufTensor(const at::Tensor& weight, GgufType type,
                                               const at::Tensor& importance,
                                               absl::string_view name) {
  if (!weight.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': undefined weight"));
  }
  const std::vector<int64_t> shape = weight.sizes().vec();
  ASSIGN_OR_RETURN(const GgufTensorLayout layout, GgufLayoutOf(type, shape, name));
  const GgufQuantizer* quantizer = FindGgufQuantizer(type);
  const std::string what = Describe(name, shape, type);
  return CatchTorchErrors(what, [&]() -> absl::StatusOr<std::string> {
    const at::ScalarType dtype = weight.scalar_type();
    if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": needs an F32, F16 or BF16 weight, not ", c10::toString(dtype)));
    }
    const int64_t n = layout.row_elements;
    std::vector<float> weights;
    if (importance.defined()) {
      if (importance.dim() != 1 || importance.size(0) != n ||
          !at::isFloatingType(importance.scalar_type())) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": importance must be a floating-point [", n,
                         "] vector (one weight per column), not ",
                         c10::toString(importance.scalar_type()), " [",
                         absl::StrJoin(importance.sizes(), ", "), "]"));
      }
      const at::Tensor qw = importance.to(at::kCPU, at::kFloat).contiguous();
      weights.assign(qw.data_ptr<float>(), qw.data_ptr<float>() + n);
      for (int64_t j = 0; j < n; ++j) {
        if (!std::isfinite(weights[j]) || weights[j] < 0.0f) {
          return absl::InvalidArgumentError(absl::StrCat(what, ": importance[", j, "] = ",
                                                         weights[j],
                                                         " is not a finite non-negative weight"));
        }
      }
    }
    const float* qw = weights.empty() ? nullptr : weights.data();
    const at::Tensor w = weight.to(at::kCPU).contiguous();
    const char* data = static_cast<const char*>(w.data_ptr());
    const int64_t element_size = static_cast<int64_t>(w.element_size());

    std::string bytes(static_cast<size_t>(layout.bytes), '\0');
    uint8_t* out = reinterpret_cast<uint8_t*>(bytes.data());
    std::atomic<int64_t> bad_input{std::numeric_limits<int64_t>::max()};
    std::atomic<int64_t> bad_output{std::numeric_limits<int64_t>::max()};
    const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
    at::parallel_for(0, layout.rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> row(dtype == at::kFloat ? 0 : n);
      std::vector<float> check;
      for (int64_t r = begin; r < end; ++r) {
        const char* src = data + r * n * element_size;
        const float* x;
        if (dtype == at::kFloat) {
          x = reinterpret_cast<const float*>(src);
        } else if (dtype == at::kHalf) {
          HalfRowToFloat(reinterpret_cast<const c10::Half*>(src), n, row.data());
          x = row.data();
        } else {
          BFloat16RowToFloat(reinterpret_cast<const c10::BFloat16*>(src), n, row.data());
          x = row.data();
        }
        const uint32_t top = MaxAbsBits(x, n);
        if (top >= kNonFiniteBits) {
          AtomicMin(bad_input, r);
          continue;
        }
        uint8_t* row_out = out + r * layout.row_bytes;
        quantizer->quantize_row(x, n, qw, row_out);
        float row_max;
        std::memcpy(&row_max, &top, sizeof(row_max));
        if (row_max > kOverflowPossibleAbove) {
          check.resize(n);
          quantizer->dequantize_row(row_out, n, check.data());
          if (!AllFinite(check.data(), n)) AtomicMin(bad_output, r);
        }
      }
    });
    if (bad_input.load() != std::numeric_limits<int64_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": row ", bad_input.load(), " contains NaN or Inf"));
    }
    if (bad_output.load() != std::numeric_limits<int64_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": row ", bad_output.load(),
                       " does not fit: its quantized values overflow float16"));
    }
    if (static_cast<int64_t>(bytes.size()) != layout.bytes) {
      return absl::InternalError(absl::StrCat(what, ": produced ", bytes.size(),
                                              " bytes, expected ", layout.bytes));
    }
    return bytes;
  });
}

absl::StatusOr<at::Tensor> DequantizeGgufTensor(absl::string_view bytes, GgufType type,
                                                const std::vector<int64_t>& shape,
                                                absl::string_view name) {
  ASSIGN_OR_RETURN(const GgufTensorLayout layout, GgufLayoutOf(type, shape, name));
  const std::string what = Describe(name, shape, type);
  if (static_cast<int64_t>(bytes.size()) != layout.bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", bytes.size(), " bytes, expected ", layout.bytes));
  }
  const GgufQuantizer* quantizer = FindGgufQuantizer(type);
  return CatchTorchErrors(what, [&]() -> absl::StatusOr<at::Tensor> {
    at::Tensor result = at::empty(shape, at::kFloat);
    float* out = result.data_ptr<float>();
    const uint8_t* in = reinterpret_cast<const uint8_t*>(bytes.data());
    const int64_t n = layout.row_elements;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
    at::parallel_for(0, layout.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        quantizer->dequantize_row(in + r * layout.row_bytes, n, out + r * n);
      }
    });
    return result;
  });
}

}  // namespace compress::engine
