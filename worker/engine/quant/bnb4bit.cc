// bitsandbytes 4-bit (NF4 / FP4): the code tables, the fast paths (a C++ loop
// on the CPU, ATen ops elsewhere), serialization to and from the Linear4bit state dict, and, in the
// last section of this file, the scalar references the tests check the fast path against. The
// formats and the on-disk layout are described in bnb4bit.h.
#include "worker/engine/quant/bnb4bit.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/model/tensor_dtype.h"
#include "worker/engine/quant/quantized_tensor.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

// Elements per chunk of blocks on the CPU: 256 Ki values, 1 MiB of float32,
// small enough that the passes below over one chunk stay in cache.
constexpr int64_t kCpuChunkElements = int64_t{1} << 18;
// bitsandbytes passes the element count to its kernels as a C int.
constexpr int64_t kMaxElements = int64_t{1} << 31;
// How far a stored quant_map / nested_quant_map may be from ours (torch's
// vectorized linspace can move an entry of the dynamic map by an ulp).
constexpr float kMapTolerance = 1e-6f;

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// One row per weight dtype: the safetensors and ATen types and the name
// bitsandbytes writes as quant_state "dtype" (str(torch dtype) minus "torch.").
struct BnbDtype {
  SafetensorsDtype safetensors;
  at::ScalarType aten;
  const char* torch_name;
};
constexpr BnbDtype kBnbDtypes[] = {
    {SafetensorsDtype::kF32, at::kFloat, "float32"},
    {SafetensorsDtype::kF16, at::kHalf, "float16"},
    {SafetensorsDtype::kBF16, at::kBFloat16, "bfloat16"},
};

const BnbDtype* FindDtype(SafetensorsDtype dtype) {
  for (const BnbDtype& row : kBnbDtypes) {
    if (row.safetensors == dtype) return &row;
  }
  return nullptr;
}
const BnbDtype* FindDtype(at::ScalarType dtype) {
  for (const BnbDtype& row : kBnbDtypes) {
    if (row.aten == dtype) return &row;
  }
  return nullptr;
}
const BnbDtype* FindDtype(absl::string_view torch_name) {
  for (const BnbDtype& row : kBnbDtypes) {
    if (torch_name == row.torch_name) return &row;
  }
  return nullptr;
}

bool IsBlockSize(int64_t size) { return size >= 64 && size <= 4096 && (size & (size - 1)) == 0; }

// numel of `shape`, or INVALID_ARGUMENT unless 1 <= numel < 2^31.
absl::StatusOr<int64_t> CheckedNumel(const std::vector<int64_t>& shape, absl::string_view name) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' ", ShapeString(shape), ": negative dimension"));
    }
    if (d != 0 && n > (kMaxElements - 1) / d) {
      n = kMaxElements;
      break;
    }
    n *= d;
  }
  if (n == 0 || n >= kMaxElements) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' ", ShapeString(shape), ": bitsandbytes 4-bit needs ",
                     "1 to 2^31 - 1 elements (its kernels count them in an int32)"));
  }
  return n;
}

// The candidates of a nearest-value search, sorted by value, with the float32
// midpoints between neighbours. NF4: all 16 codes. FP4: the 8 magnitudes
// (codes 0..7), the sign being bit 3. The dynamic map: its 256 entries.
struct CodeGrid {
  std::vector<float> values;
  std::vector<uint8_t> codes;
  std::vector<float> midpoints;  // values.size() - 1
  bool identity = true;          // codes[k] == k
};

CodeGrid MakeGrid(const float* values, int count) {
  std::vector<int> order(count);
  for (int i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [values](int a, int b) { return values[a] < values[b]; });
  CodeGrid grid;
  for (int k = 0; k < count; ++k) {
    grid.values.push_back(values[order[k]]);
    grid.codes.push_back(static_cast<uint8_t>(order[k]));
    grid.identity = grid.identity && order[k] == k;
  }
  for (int k = 0; k + 1 < count; ++k) {
    grid.midpoints.push_back((grid.values[k] + grid.values[k + 1]) * 0.5f);
  }
  return grid;
}

const CodeGrid& FourBitGrid(Bnb4BitType type) {
  static const CodeGrid nf4 = MakeGrid(FindBnb4BitFormat(Bnb4BitType::kNf4).quant_map.data(), 16);
  static const CodeGrid fp4 = MakeGrid(FindBnb4BitFormat(Bnb4BitType::kFp4).quant_map.data(), 8);
  return type == Bnb4BitType::kNf4 ? nf4 : fp4;
}

const CodeGrid& DynamicGrid() {
  static const CodeGrid grid = MakeGrid(Bnb4BitDynamicMap().data(), 256);
  return grid;
}

at::Tensor FloatTensor(const float* values, int64_t count, const at::Device& device) {
  return at::from_blob(const_cast<float*>(values), {count}, at::kFloat)
      .to(device, /*non_blocking=*/false,
          /*copy=*/true);
}

// A CodeGrid as small tensors on the device the fast path runs on.
struct DeviceGrid {
  at::Tensor midpoints;  // float32
  at::Tensor codes;      // uint8
  bool identity;
  bool sign_magnitude;
};

DeviceGrid ToDevice(const CodeGrid& grid, bool sign_magnitude, const at::Device& device) {
  DeviceGrid d;
  d.midpoints =
      FloatTensor(grid.midpoints.data(), static_cast<int64_t>(grid.midpoints.size()), device);
  d.codes = at::from_blob(const_cast<uint8_t*>(grid.codes.data()),
                          {static_cast<int64_t>(grid.codes.size())}, at::kByte)
                .to(device, /*non_blocking=*/false, /*copy=*/true);
  d.identity = grid.identity;
  d.sign_magnitude = sign_magnitude;
  return d;
}

// ---------------------------------------------------------------------------
// The fast paths.
// ---------------------------------------------------------------------------

// ATen ops: blockwise absmax quantization of the rows of `x` ([b, size], float32) onto
// `grid`: writes codes [b, size] and absmax [b]. Returns false (outputs
// unspecified) if x holds NaN or Inf: amax propagates both, so the check is
// on the small result.
bool QuantizeRows(const at::Tensor& x, const DeviceGrid& grid, at::Tensor codes_out,
                  at::Tensor absmax_out) {
  at::Tensor absmax = x.abs().amax(/*dim=*/1, /*keepdim=*/true);
  if (!at::isfinite(absmax).all().item<bool>()) return false;
  // A zero block divides by 1 instead: its values stay 0 and take the code of 0.
  at::Tensor divisor = absmax.masked_fill(absmax == 0, 1.0);
  at::Tensor normalized = x.div(divisor);  // tensor by tensor: a true division
  at::Tensor codes;
  if (grid.sign_magnitude) {
    at::Tensor position = at::bucketize(normalized.abs(), grid.midpoints, /*out_int32=*/true);
    codes = grid.codes.index_select(0, position.view(-1)).view(position.sizes());
    codes.bitwise_or_(normalized.lt(0).to(at::kByte).mul_(8));
  } else {
    at::Tensor position = at::bucketize(normalized, grid.midpoints, /*out_int32=*/true);
    codes = grid.identity ? position.to(at::kByte)
                          : grid.codes.index_select(0, position.view(-1)).view(position.sizes());
  }
  codes_out.copy_(codes);
  absmax_out.copy_(absmax.view(-1));
  return true;
}

// The CPU kernel: blocks [first, last) of `x` (float32, contiguous, holding
// the elements of those blocks only; the tensor's last block may be short).
// code = how many of the sorted grid's midpoints lie below y = x / divisor
// (below |y| for a sign-magnitude grid, whose sign goes to bit 3), mapped to
// the grid's code. Grid size and sign handling are template parameters, so
// the loop over the elements has a fixed-length, branch-free body the
// compiler can unroll and vectorize. False on NaN/Inf.
template <int kCandidates, bool kSignMagnitude>
bool QuantizeBlocksCpu(const float* x, int64_t first, int64_t last, int64_t size, int64_t n,
                       const CodeGrid& grid, uint8_t* codes, float* absmax) {
  float midpoints[kCandidates - 1];
  uint8_t code_of[kCandidates];
  for (int k = 0; k < kCandidates; ++k) code_of[k] = grid.codes[k];
  for (int k = 0; k + 1 < kCandidates; ++k) midpoints[k] = grid.midpoints[k];
  for (int64_t b = first; b < last; ++b) {
    const float* block = x + (b - first) * size;
    uint8_t* out = codes + b * size;
    const int64_t count = std::min(size, n - b * size);
    float m = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      if (!std::isfinite(block[i])) return false;
      m = std::max(m, std::fabs(block[i]));
    }
    absmax[b] = m;
    const float divisor = m == 0.0f ? 1.0f : m;
    for (int64_t i = 0; i < count; ++i) {
      const float y = block[i] / divisor;
      const float key = kSignMagnitude ? std::fabs(y) : y;
      int position = 0;
      for (int k = 0; k + 1 < kCandidates; ++k) position += key > midpoints[k] ? 1 : 0;
      // The sign of y, not of x: x / absmax may underflow to -0, not negative.
      if (kSignMagnitude) position |= y < 0.0f ? 8 : 0;
      out[i] = static_cast<uint8_t>(position);
    }
    if (kSignMagnitude) {
      for (int64_t i = 0; i < count; ++i) {
        out[i] = static_cast<uint8_t>(code_of[out[i] & 7] | (out[i] & 8));
      }
    } else if (!grid.identity) {
      for (int64_t i = 0; i < count; ++i) out[i] = code_of[out[i]];
    }
  }
  return true;
}

// The CPU fast path over a flat tensor: chunks of whole blocks in parallel.
// The 4-bit grids: NF4's 16 codes, or FP4's 8 magnitudes and a sign bit.
bool QuantizeFlatCpu(const at::Tensor& flat, int64_t size, const CodeGrid& grid,
                     bool sign_magnitude, at::Tensor codes, at::Tensor absmax) {
  TORCH_CHECK(grid.values.size() == (sign_magnitude ? 8u : 16u), "bnb4bit: unexpected grid");
  const int64_t n = flat.numel();
  const int64_t blocks = (n + size - 1) / size;
  const int64_t blocks_per_chunk = std::max<int64_t>(1, kCpuChunkElements / size);
  uint8_t* code_data = codes.data_ptr<uint8_t>();
  float* absmax_data = absmax.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, blocks, blocks_per_chunk, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += blocks_per_chunk) {
      const int64_t last = std::min(end, first + blocks_per_chunk);
      const int64_t start = first * size;
      at::Tensor chunk =
          flat.narrow(0, start, std::min(n, last * size) - start).to(at::kFloat).contiguous();
      const float* x = chunk.data_ptr<float>();
      const bool ok =
          sign_magnitude
              ? QuantizeBlocksCpu<8, true>(x, first, last, size, n, grid, code_data, absmax_data)
              : QuantizeBlocksCpu<16, false>(x, first, last, size, n, grid, code_data, absmax_data);
      if (!ok) finite = false;
    }
  });
  return finite;
}

// Blockwise quantization of a flat float tensor `flat` [n] into codes [n]
// and absmax [ceil(n / size)] with ATen ops: whole blocks in chunks (in
// parallel on the CPU), the partial last block zero-padded (zeros change no
// absmax).
bool QuantizeFlat(const at::Tensor& flat, int64_t size, const DeviceGrid& grid, at::Tensor codes,
                  at::Tensor absmax) {
  const int64_t n = flat.numel();
  const int64_t full = n / size;
  const int64_t rest = n - full * size;
  std::atomic<bool> finite{true};
  if (full > 0) {
    at::Tensor rows = flat.narrow(0, 0, full * size).view({full, size});
    at::Tensor code_rows = codes.narrow(0, 0, full * size).view({full, size});
    const int64_t rows_per_chunk =
        flat.is_cpu() ? std::max<int64_t>(1, kCpuChunkElements / size) : full;
    auto quantize = [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row += rows_per_chunk) {
        const int64_t count = std::min(rows_per_chunk, end - row);
        if (!QuantizeRows(rows.narrow(0, row, count).to(at::kFloat), grid,
                          code_rows.narrow(0, row, count), absmax.narrow(0, row, count))) {
          finite = false;
        }
      }
    };
    if (flat.is_cpu()) {
      at::parallel_for(0, full, rows_per_chunk, quantize);
    } else {
      quantize(0, full);
    }
  }
  if (rest > 0) {
    at::Tensor tail =
        at::constant_pad_nd(flat.narrow(0, full * size, rest).to(at::kFloat), {0, size - rest}, 0)
            .view({1, size});
    at::Tensor tail_codes = at::empty({1, size}, codes.options());
    if (!QuantizeRows(tail, grid, tail_codes, absmax.narrow(0, full, 1))) finite = false;
    codes.narrow(0, full * size, rest).copy_(tail_codes.view(-1).narrow(0, 0, rest));
  }
  return finite;
}

// Values [blocks * size or fewer] times one scale per block of `size`.
at::Tensor ScaleBlocks(const at::Tensor& values, const at::Tensor& scales, int64_t size) {
  const int64_t n = values.numel();
  const int64_t blocks = scales.numel();
  at::Tensor padded =
      n == blocks * size ? values : at::constant_pad_nd(values, {0, blocks * size - n}, 0);
  return padded.view({blocks, size}).mul(scales.view({blocks, 1})).view(-1).narrow(0, 0, n);
}

absl::Status CheckWeight(const at::Tensor& weight, const Bnb4BitOptions& options,
                         absl::string_view name) {
  RETURN_IF_ERROR(ValidateBnb4BitOptions(options));
  if (!weight.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is undefined"));
  }
  if (FindDtype(weight.scalar_type()) == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' ", ShapeString(weight.sizes()),
                     ": bitsandbytes 4-bit needs a float32, float16 or bfloat16 weight, not ",
                     c10::toString(weight.scalar_type())));
  }
  return CheckedNumel(weight.sizes().vec(), name).status();
}

absl::Status CheckScales(const at::Tensor& scales, absl::string_view what, absl::string_view name) {
  if (!at::isfinite(scales).all().item<bool>() || scales.lt(0).any().item<bool>()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': ", what, " holds a negative, NaN or Inf value"));
  }
  return absl::OkStatus();
}

}  // namespace

const Bnb4BitFormat& FindBnb4BitFormat(Bnb4BitType type) {
  for (const Bnb4BitFormat& row : kBnb4BitFormats) {
    if (row.type == type) return row;
  }
  return kBnb4BitFormats[0];  // unreachable: every enumerator has a row
}

const std::array<float, 256>& Bnb4BitDynamicMap() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
  // non_sign_bits = 7, additional_items = 2^(7-7) - 1 = 0, and for i in 0..6
  // fraction_items = 2^i + 1 boundaries. Every step below is one float32
  // operation, as the torch float32 tensors of the source compute it.
  static const std::array<float, 256> map = [] {
    constexpr double kPowersOfTen[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    std::vector<float> data;
    for (int i = 0; i < 7; ++i) {
      const int64_t steps = (int64_t{1} << i) + 1;
      // torch.linspace(0.1, 1, steps): step = (end - start) / (steps - 1);
      // the first half counts up from start, the second half down from end.
      const float start = 0.1f;
      const float end = 1.0f;
      const float step = (end - start) / static_cast<float>(steps - 1);
      std::vector<float> boundaries(steps);
      for (int64_t k = 0; k < steps; ++k) {
        boundaries[k] = k < steps / 2 ? start + step * static_cast<float>(k)
                                      : end - step * static_cast<float>(steps - k - 1);
      }
      // means = (boundaries[:-1] + boundaries[1:]) / 2, times +-10^(i-6).
      const float scale = static_cast<float>(kPowersOfTen[i]);
      for (int64_t k = 0; k + 1 < steps; ++k) {
        const float mean = (boundaries[k] + boundaries[k + 1]) / 2.0f;
        data.push_back(scale * mean);
        data.push_back(-scale * mean);
      }
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    std::sort(data.begin(), data.end());
    std::array<float, 256> out{};
    std::copy(data.begin(), data.end(), out.begin());  // exactly 2 * 127 + 2 values
    return out;
  }();
  return map;
}

absl::Status ValidateBnb4BitOptions(const Bnb4BitOptions& options) {
  if (options.type != Bnb4BitType::kNf4 && options.type != Bnb4BitType::kFp4) {
    return absl::InvalidArgumentError(
        absl::StrCat("bnb4bit: type ", static_cast<int>(options.type), " is neither nf4 nor fp4"));
  }
  if (!IsBlockSize(options.block_size)) {
    return absl::InvalidArgumentError(absl::StrCat("bnb4bit: block_size ", options.block_size,
                                                   " is not a power of two in 64..4096"));
  }
  if (options.double_quant && !IsBlockSize(options.nested_block_size)) {
    return absl::InvalidArgumentError(absl::StrCat("bnb4bit: nested_block_size ",
                                                   options.nested_block_size,
                                                   " is not a power of two in 64..4096"));
  }
  return absl::OkStatus();
}

int64_t Bnb4BitTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<Bnb4BitTensor> QuantizeBnb4Bit(const at::Tensor& weight,
                                              const Bnb4BitOptions& options, absl::string_view name,
                                              Bnb4BitKernel kernel) {
  RETURN_IF_ERROR(CheckWeight(weight, options, name));
  return CatchTorchErrors(
      absl::StrCat("bnb4bit: tensor '", name, "'"), [&]() -> absl::StatusOr<Bnb4BitTensor> {
        const Bnb4BitFormat& format = FindBnb4BitFormat(options.type);
        const at::Device device = weight.device();
        Bnb4BitTensor q;
        q.shape = weight.sizes().vec();
        q.dtype = weight.scalar_type();
        q.options = options;
        const int64_t n = q.numel();
        const int64_t blocks = q.blocks();
        q.codes = at::empty({n}, weight.options().dtype(at::kByte));
        at::Tensor absmax = at::empty({blocks}, weight.options().dtype(at::kFloat));
        const at::Tensor flat = weight.reshape({-1});
        const bool finite =
            weight.is_cpu() && kernel == Bnb4BitKernel::kAuto
                ? QuantizeFlatCpu(flat, options.block_size, FourBitGrid(options.type),
                                  format.sign_magnitude, q.codes, absmax)
                : QuantizeFlat(flat, options.block_size,
                               ToDevice(FourBitGrid(options.type), format.sign_magnitude, device),
                               q.codes, absmax);
        if (!finite) {
          return absl::InvalidArgumentError(absl::StrCat(
              "tensor '", name, "' ", ShapeString(weight.sizes()), " contains NaN or Inf"));
        }
        if (!options.double_quant) {
          q.absmax = absmax;
          return q;
        }
        // Double quantization: the absmax, centred on its mean, blockwise
        // 8-bit on the dynamic map.
        const double sum = absmax.to(at::kDouble).sum().item<double>();
        q.nested_offset = static_cast<float>(sum / static_cast<double>(blocks));
        at::Tensor centred = absmax.sub(at::full({1}, q.nested_offset, absmax.options()));
        q.quantized_absmax = at::empty({blocks}, absmax.options().dtype(at::kByte));
        q.nested_absmax = at::empty({q.nested_blocks()}, absmax.options());
        const DeviceGrid dynamic = ToDevice(DynamicGrid(), /*sign_magnitude=*/false, device);
        if (!QuantizeFlat(centred, options.nested_block_size, dynamic, q.quantized_absmax,
                          q.nested_absmax)) {
          return absl::InternalError(absl::StrCat("tensor '", name, "': absmax overflowed"));
        }
        return q;
      });
}

at::Tensor DequantizeBnb4BitAbsmax(const Bnb4BitTensor& q) {
  if (!q.options.double_quant) return q.absmax.to(at::kFloat);
  const std::array<float, 256>& map = Bnb4BitDynamicMap();
  at::Tensor nested_map = FloatTensor(map.data(), 256, q.quantized_absmax.device());
  at::Tensor values = nested_map.index_select(0, q.quantized_absmax.to(at::kInt));
  // Multiply, then add: two float32 roundings, as bitsandbytes'
  // dequantize_blockwise followed by `absmax += offset`.
  return ScaleBlocks(values, q.nested_absmax, q.options.nested_block_size)
      .add(at::full({1}, q.nested_offset, values.options()));
}

at::Tensor DequantizeBnb4Bit(const Bnb4BitTensor& q, at::ScalarType dtype) {
  const Bnb4BitFormat& format = FindBnb4BitFormat(q.options.type);
  at::Tensor table = FloatTensor(format.quant_map.data(), 16, q.codes.device());
  at::Tensor values = table.index_select(0, q.codes.to(at::kInt));
  return ScaleBlocks(values, DequantizeBnb4BitAbsmax(q), q.options.block_size)
      .to(dtype)
      .view(q.shape);
}

absl::Status ValidateBnb4Bit(const Bnb4BitTensor& q, absl::string_view name) {
  RETURN_IF_ERROR(ValidateBnb4BitOptions(q.options));
  ASSIGN_OR_RETURN(const int64_t n, CheckedNumel(q.shape, name));
  if (FindDtype(q.dtype) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': dtype ",
                                                   c10::toString(q.dtype),
                                                   " is not float32, float16 or bfloat16"));
  }
  return CatchTorchErrors(absl::StrCat("bnb4bit: validate '", name, "'"), [&]() -> absl::Status {
    RETURN_IF_ERROR(CheckTensor(q.codes, at::kByte, {n}, "codes", name));
    if (q.codes.max().item<int>() >= 16) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': a code exceeds 15"));
    }
    const int64_t blocks = q.blocks();
    if (!q.options.double_quant) {
      if (q.quantized_absmax.defined() || q.nested_absmax.defined()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", name, "': nested absmax tensors without double quantization"));
      }
      RETURN_IF_ERROR(CheckTensor(q.absmax, at::kFloat, {blocks}, "absmax", name));
      return CheckScales(q.absmax, "absmax", name);
    }
    if (q.absmax.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "': a float absmax with double quantization (it is quantized)"));
    }
    RETURN_IF_ERROR(CheckTensor(q.quantized_absmax, at::kByte, {blocks}, "quantized absmax", name));
    RETURN_IF_ERROR(
        CheckTensor(q.nested_absmax, at::kFloat, {q.nested_blocks()}, "nested absmax", name));
    RETURN_IF_ERROR(CheckScales(q.nested_absmax, "nested absmax", name));
    if (!std::isfinite(q.nested_offset) || q.nested_offset < 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': nested offset ",
                                                     q.nested_offset, " is not finite and >= 0"));
    }
    return absl::OkStatus();
  });
}

// ---------------------------------------------------------------------------
// Serialization.
// ---------------------------------------------------------------------------

std::string FormatBnb4BitQuantState(const Bnb4BitQuantState& state) {
  // json.dumps(dict) with its default separators; strings here never need
  // escaping (they come from the fixed tables).
  std::string json = absl::StrCat(
      "{\"quant_type\": \"", state.quant_type, "\", \"blocksize\": ", state.blocksize,
      ", \"dtype\": \"", state.dtype, "\", \"shape\": [", absl::StrJoin(state.shape, ", "), "]");
  if (state.nested) {
    // +0.0f turns -0 into 0: the sign would add a character.
    const double offset = static_cast<double>(state.nested_offset + 0.0f);
    absl::StrAppend(&json, ", \"nested_blocksize\": ", state.nested_blocksize,
                    ", \"nested_dtype\": \"", state.nested_dtype,
                    "\", \"nested_offset\": ", absl::StrFormat("%.9e", offset));
  }
  absl::StrAppend(&json, "}");
  return json;
}

absl::StatusOr<Bnb4BitQuantState> ParseBnb4BitQuantState(absl::string_view json,
                                                         absl::string_view name) {
  auto error = [&](absl::string_view problem) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': quant_state JSON ", problem));
  };
  const nlohmann::json parsed = nlohmann::json::parse(json.begin(), json.end(), nullptr,
                                                      /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) return error("is not a JSON object");
  static const std::set<std::string> kKeys = {"quant_type",   "blocksize",        "dtype",
                                              "shape",        "nested_blocksize", "nested_dtype",
                                              "nested_offset"};
  for (const auto& item : parsed.items()) {
    if (kKeys.count(item.key()) == 0)
      return error(absl::StrCat("has unknown key '", item.key(), "'"));
  }
  Bnb4BitQuantState state;
  if (!parsed.contains("quant_type") || !parsed["quant_type"].is_string()) {
    return error("needs a string quant_type");
  }
  state.quant_type = parsed["quant_type"].get<std::string>();
  if (state.quant_type != "nf4" && state.quant_type != "fp4") {
    return error(absl::StrCat("quant_type '", state.quant_type, "' is neither nf4 nor fp4"));
  }
  if (!parsed.contains("blocksize") || !parsed["blocksize"].is_number_integer()) {
    return error("needs an integer blocksize");
  }
  state.blocksize = parsed["blocksize"].get<int64_t>();
  if (!IsBlockSize(state.blocksize)) {
    return error(absl::StrCat("blocksize ", state.blocksize, " is not a power of two in 64..4096"));
  }
  if (!parsed.contains("dtype") || !parsed["dtype"].is_string() ||
      FindDtype(parsed["dtype"].get<std::string>()) == nullptr) {
    return error("needs dtype float32, float16 or bfloat16");
  }
  state.dtype = parsed["dtype"].get<std::string>();
  if (!parsed.contains("shape") || !parsed["shape"].is_array()) return error("needs a shape list");
  for (const nlohmann::json& d : parsed["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0) {
      return error("has a shape entry that is not a non-negative integer");
    }
    state.shape.push_back(d.get<int64_t>());
  }
  const int nested_keys = static_cast<int>(parsed.contains("nested_blocksize")) +
                          static_cast<int>(parsed.contains("nested_dtype")) +
                          static_cast<int>(parsed.contains("nested_offset"));
  if (nested_keys != 0 && nested_keys != 3) {
    return error("has some but not all of nested_blocksize, nested_dtype, nested_offset");
  }
  state.nested = nested_keys == 3;
  if (state.nested) {
    if (!parsed["nested_blocksize"].is_number_integer() ||
        !IsBlockSize(parsed["nested_blocksize"].get<int64_t>())) {
      return error("nested_blocksize is not a power of two in 64..4096");
    }
    state.nested_blocksize = parsed["nested_blocksize"].get<int64_t>();
    if (!parsed["nested_dtype"].is_string() ||
        parsed["nested_dtype"].get<std::string>() != "float32") {
      return error("nested_dtype is not float32");
    }
    if (!parsed["nested_offset"].is_number()) return error("nested_offset is not a number");
    const double offset = parsed["nested_offset"].get<double>();
    if (!std::isfinite(offset) || offset < 0 || offset > std::numeric_limits<float>::max()) {
      return error(absl::StrCat("nested_offset ", offset, " is not a finite float >= 0"));
    }
    state.nested_offset = static_cast<float>(offset);
  }
  return state;
}

absl::StatusOr<std::vector<SafetensorsTensorSpec>> Bnb4BitTensorSpecs(
    const std::string& weight_name, const std::vector<int64_t>& shape, SafetensorsDtype dtype,
    const Bnb4BitOptions& options) {
  RETURN_IF_ERROR(ValidateBnb4BitOptions(options));
  const BnbDtype* bnb_dtype = FindDtype(dtype);
  if (bnb_dtype == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", weight_name, "' ",
                                                   ShapeString(shape), ": dtype ", DtypeName(dtype),
                                                   " is not F32, F16 or BF16"));
  }
  ASSIGN_OR_RETURN(const int64_t n, CheckedNumel(shape, weight_name));
  const Bnb4BitFormat& format = FindBnb4BitFormat(options.type);
  const int64_t blocks = (n + options.block_size - 1) / options.block_size;
  Bnb4BitQuantState state;
  state.quant_type = format.quant_type;
  state.blocksize = options.block_size;
  state.dtype = bnb_dtype->torch_name;
  state.shape = shape;
  state.nested = options.double_quant;
  state.nested_blocksize = options.nested_block_size;
  const int64_t json_bytes = static_cast<int64_t>(FormatBnb4BitQuantState(state).size());

  std::vector<SafetensorsTensorSpec> specs;
  specs.push_back({weight_name, SafetensorsDtype::kU8, {(n + 1) / 2, 1}});
  specs.push_back({weight_name + kBnbAbsmaxSuffix,
                   options.double_quant ? SafetensorsDtype::kU8 : SafetensorsDtype::kF32,
                   {blocks}});
  specs.push_back({weight_name + kBnbQuantMapSuffix, SafetensorsDtype::kF32, {16}});
  if (options.double_quant) {
    const int64_t nested_blocks =
        (blocks + options.nested_block_size - 1) / options.nested_block_size;
    specs.push_back(
        {weight_name + kBnbNestedAbsmaxSuffix, SafetensorsDtype::kF32, {nested_blocks}});
    specs.push_back({weight_name + kBnbNestedQuantMapSuffix, SafetensorsDtype::kF32, {256}});
  }
  specs.push_back({absl::StrCat(weight_name, kBnbQuantStateSuffix, format.quant_type),
                   SafetensorsDtype::kU8,
                   {json_bytes}});
  return specs;
}

absl::StatusOr<int64_t> Bnb4BitSerializedBytes(const std::vector<int64_t>& shape,
                                               SafetensorsDtype dtype,
                                               const Bnb4BitOptions& options) {
  ASSIGN_OR_RETURN(const std::vector<SafetensorsTensorSpec> specs,
                   Bnb4BitTensorSpecs("weight", shape, dtype, options));
  int64_t total = 0;
  for (const SafetensorsTensorSpec& spec : specs) {
    int64_t bytes = DtypeBytes(spec.dtype);
    for (int64_t d : spec.shape) bytes *= d;
    total += bytes;
  }
  return total;
}

absl::StatusOr<double> Bnb4BitBitsPerWeight(const std::vector<int64_t>& shape,
                                            SafetensorsDtype dtype, const Bnb4BitOptions& options) {
  ASSIGN_OR_RETURN(const int64_t bytes, Bnb4BitSerializedBytes(shape, dtype, options));
  ASSIGN_OR_RETURN(const int64_t n, CheckedNumel(shape, "weight"));
  return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
}

absl::StatusOr<NamedTensors> SerializeBnb4Bit(const Bnb4BitTensor& q,
                                              const std::string& weight_name) {
  RETURN_IF_ERROR(ValidateBnb4Bit(q, weight_name));
  const BnbDtype* bnb_dtype = FindDtype(q.dtype);  // validated above
  ASSIGN_OR_RETURN(const std::vector<SafetensorsTensorSpec> specs,
                   Bnb4BitTensorSpecs(weight_name, q.shape, bnb_dtype->safetensors, q.options));
  return CatchTorchErrors(
      absl::StrCat("bnb4bit: serialize '", weight_name, "'"),
      [&]() -> absl::StatusOr<NamedTensors> {
        const Bnb4BitFormat& format = FindBnb4BitFormat(q.options.type);
        const int64_t n = q.numel();
        // Two codes a byte, the first in the high nibble.
        at::Tensor codes = q.codes.to(at::kCPU);
        if (n % 2 != 0) {
          codes = at::cat({codes, at::full({1}, format.zero_code, codes.options())});
        }
        at::Tensor pairs = codes.view({-1, 2});
        at::Tensor packed =
            pairs.select(1, 0).mul(16).add_(pairs.select(1, 1)).contiguous().view({-1, 1});

        Bnb4BitQuantState state;
        state.quant_type = format.quant_type;
        state.blocksize = q.options.block_size;
        state.dtype = bnb_dtype->torch_name;
        state.shape = q.shape;
        state.nested = q.options.double_quant;
        state.nested_blocksize = q.options.nested_block_size;
        state.nested_offset = q.nested_offset;
        const std::string json = FormatBnb4BitQuantState(state);
        at::Tensor json_tensor = at::empty({static_cast<int64_t>(json.size())}, at::kByte);
        std::memcpy(json_tensor.data_ptr<uint8_t>(), json.data(), json.size());

        NamedTensors out;
        out.emplace_back(specs[0].name, packed);
        if (q.options.double_quant) {
          out.emplace_back(specs[1].name, q.quantized_absmax.to(at::kCPU).contiguous());
        } else {
          out.emplace_back(specs[1].name, q.absmax.to(at::kCPU).contiguous());
        }
        out.emplace_back(specs[2].name, FloatTensor(format.quant_map.data(), 16, at::kCPU));
        if (q.options.double_quant) {
          out.emplace_back(specs[3].name, q.nested_absmax.to(at::kCPU).contiguous());
          out.emplace_back(specs[4].name, FloatTensor(Bnb4BitDynamicMap().data(), 256, at::kCPU));
        }
        out.emplace_back(specs.back().name, json_tensor);

        // The format's names, dtypes, shapes and sizes, checked before anything
        // reaches a file.
        if (out.size() != specs.size()) {
          return absl::InternalError(absl::StrCat("tensor '", weight_name, "': made ", out.size(),
                                                  " tensors, the format has ", specs.size()));
        }
        int64_t bytes = 0;
        for (size_t i = 0; i < specs.size(); ++i) {
          const std::optional<at::ScalarType> dtype = ToScalarType(specs[i].dtype);
          if (out[i].first != specs[i].name || !dtype.has_value() ||
              out[i].second.scalar_type() != *dtype ||
              out[i].second.sizes() != at::IntArrayRef(specs[i].shape)) {
            return absl::InternalError(absl::StrCat(
                "tensor '", out[i].first, "' is ", c10::toString(out[i].second.scalar_type()), " ",
                ShapeString(out[i].second.sizes()), ", the format says '", specs[i].name, "' ",
                DtypeName(specs[i].dtype), " ", ShapeString(specs[i].shape)));
          }
          bytes += static_cast<int64_t>(out[i].second.nbytes());
        }
        ASSIGN_OR_RETURN(const int64_t expected,
                         Bnb4BitSerializedBytes(q.shape, bnb_dtype->safetensors, q.options));
        if (bytes != expected) {
          return absl::InternalError(absl::StrCat("tensor '", weight_name, "': serialized ", bytes,
                                                  " bytes, the format says ", expected));
        }
        return out;
      });
}

absl::StatusOr<Bnb4BitTensor> ParseBnb4Bit(const NamedTensors& tensors,
                                           const std::string& weight_name) {
  // This weight's tensors: its own name and every "<weight>." name.
  std::map<std::string, at::Tensor> mine;
  for (const auto& [tensor_name, tensor] : tensors) {
    if (tensor_name != weight_name && !absl::StartsWith(tensor_name, weight_name + ".")) continue;
    if (!mine.emplace(tensor_name, tensor).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor_name, "' appears twice"));
    }
  }
  // Exactly one packed quant state, and it names the type.
  const std::string state_prefix = weight_name + ".quant_state";
  std::string state_name;
  for (const auto& [tensor_name, tensor] : mine) {
    if (!absl::StartsWith(tensor_name, state_prefix)) continue;
    if (!state_name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", weight_name,
                                                     "': more than one quant_state: '", state_name,
                                                     "', '", tensor_name, "'"));
    }
    state_name = tensor_name;
  }
  if (state_name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", weight_name, "': no '", weight_name,
                                                   kBnbQuantStateSuffix, "nf4' or 'fp4' tensor"));
  }
  const at::Tensor& state_tensor = mine[state_name];
  if (!state_tensor.defined() || state_tensor.scalar_type() != at::kByte ||
      state_tensor.dim() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", state_name, "' is not a 1-D uint8 tensor"));
  }
  at::Tensor state_bytes = state_tensor.to(at::kCPU).contiguous();
  ASSIGN_OR_RETURN(
      const Bnb4BitQuantState state,
      ParseBnb4BitQuantState(
          absl::string_view(reinterpret_cast<const char*>(state_bytes.data_ptr<uint8_t>()),
                            static_cast<size_t>(state_bytes.numel())),
          state_name));
  if (state_name != absl::StrCat(weight_name, kBnbQuantStateSuffix, state.quant_type)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", state_name, "': name does not match quant_type '", state.quant_type, "'"));
  }

  Bnb4BitTensor q;
  q.options.type = state.quant_type == "nf4" ? Bnb4BitType::kNf4 : Bnb4BitType::kFp4;
  q.options.block_size = state.blocksize;
  q.options.double_quant = state.nested;
  q.options.nested_block_size = state.nested_blocksize;
  q.shape = state.shape;
  q.nested_offset = state.nested_offset;
  const BnbDtype* bnb_dtype = FindDtype(state.dtype);  // checked by the parser
  q.dtype = bnb_dtype->aten;
  ASSIGN_OR_RETURN(const std::vector<SafetensorsTensorSpec> specs,
                   Bnb4BitTensorSpecs(weight_name, q.shape, bnb_dtype->safetensors, q.options));

  // Nothing under the prefix but the tensors the format names, and each of
  // those with its dtype and shape (the quant state's length is whatever its
  // writer's JSON took).
  for (const auto& [tensor_name, tensor] : mine) {
    bool known = false;
    for (const SafetensorsTensorSpec& spec : specs) known = known || spec.name == tensor_name;
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor_name, "' is not part of a ",
                                                     state.nested ? "double-quantized " : "",
                                                     state.quant_type, " weight"));
    }
  }
  for (const SafetensorsTensorSpec& spec : specs) {
    auto it = mine.find(spec.name);
    if (it == mine.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", spec.name, "' is missing"));
    }
    if (spec.name == state_name) continue;
    RETURN_IF_ERROR(
        CheckTensor(it->second, *ToScalarType(spec.dtype), spec.shape, "this tensor", spec.name));
  }

  return CatchTorchErrors(
      absl::StrCat("bnb4bit: parse '", weight_name, "'"), [&]() -> absl::StatusOr<Bnb4BitTensor> {
        const Bnb4BitFormat& format = FindBnb4BitFormat(q.options.type);
        auto check_map = [&](const std::string& map_name, const float* ours,
                             int64_t count) -> absl::Status {
          at::Tensor stored = mine[map_name].to(at::kCPU);
          const float deviation =
              (stored - FloatTensor(ours, count, at::kCPU)).abs().max().item<float>();
          if (!(deviation <= kMapTolerance)) {
            return absl::InvalidArgumentError(absl::StrCat(
                "tensor '", map_name, "' differs from bitsandbytes' ", format.quant_type,
                map_name == weight_name + kBnbQuantMapSuffix ? " table" : " dynamic map", " by ",
                deviation));
          }
          return absl::OkStatus();
        };
        RETURN_IF_ERROR(check_map(weight_name + kBnbQuantMapSuffix, format.quant_map.data(), 16));

        const int64_t n = q.numel();
        at::Tensor packed = mine[weight_name].to(at::kCPU).view(-1);
        q.codes = at::stack({at::bitwise_right_shift(packed, 4), at::bitwise_and(packed, 15)}, 1)
                      .view(-1)
                      .narrow(0, 0, n)
                      .contiguous();
        at::Tensor absmax = mine[weight_name + kBnbAbsmaxSuffix].to(at::kCPU).contiguous();
        if (q.options.double_quant) {
          RETURN_IF_ERROR(
              check_map(weight_name + kBnbNestedQuantMapSuffix, Bnb4BitDynamicMap().data(), 256));
          q.quantized_absmax = absmax;
          q.nested_absmax = mine[weight_name + kBnbNestedAbsmaxSuffix].to(at::kCPU).contiguous();
        } else {
          q.absmax = absmax;
        }
        RETURN_IF_ERROR(ValidateBnb4Bit(q, weight_name));
        return q;
      });
}

// ---------------------------------------------------------------------------
// Scalar references: the formulas of bnb4bit.h written out one block and one
// element at a time on the CPU. Deliberately naive and independent of the
// fast path above (they share only the input checks and the tables).
// ---------------------------------------------------------------------------

namespace {

// The entry of `candidates` (value, code), sorted by value, nearest to x:
// the first whose upper midpoint is not below x.
uint8_t NearestCodeReference(const std::vector<std::pair<float, uint8_t>>& candidates, float x) {
  for (size_t k = 0; k + 1 < candidates.size(); ++k) {
    const float midpoint = (candidates[k].first + candidates[k + 1].first) * 0.5f;
    if (x <= midpoint) return candidates[k].second;
  }
  return candidates.back().second;
}

std::vector<std::pair<float, uint8_t>> SortedCandidates(const float* values, int count) {
  std::vector<std::pair<float, uint8_t>> candidates;
  for (int c = 0; c < count; ++c) candidates.emplace_back(values[c], static_cast<uint8_t>(c));
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  return candidates;
}

}  // namespace

absl::StatusOr<Bnb4BitTensor> QuantizeBnb4BitReference(const at::Tensor& weight,
                                                       const Bnb4BitOptions& options,
                                                       absl::string_view name) {
  RETURN_IF_ERROR(CheckWeight(weight, options, name));
  return CatchTorchErrors(
      absl::StrCat("bnb4bit reference: tensor '", name, "'"),
      [&]() -> absl::StatusOr<Bnb4BitTensor> {
        const Bnb4BitFormat& format = FindBnb4BitFormat(options.type);
        // FP4 searches the magnitudes (codes 0..7) and sets the sign bit.
        const auto candidates =
            SortedCandidates(format.quant_map.data(), format.sign_magnitude ? 8 : 16);
        Bnb4BitTensor q;
        q.shape = weight.sizes().vec();
        q.dtype = weight.scalar_type();
        q.options = options;
        const int64_t n = q.numel();
        const int64_t size = options.block_size;
        const int64_t blocks = q.blocks();
        at::Tensor w = weight.to(at::kCPU, at::kFloat).contiguous().view(-1);
        const float* x = w.data_ptr<float>();
        q.codes = at::empty({n}, at::kByte);
        at::Tensor absmax = at::empty({blocks}, at::kFloat);
        uint8_t* codes = q.codes.data_ptr<uint8_t>();
        float* absmax_data = absmax.data_ptr<float>();

        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t begin = b * size;
          const int64_t end = std::min(n, begin + size);
          float m = 0.0f;
          for (int64_t i = begin; i < end; ++i) {
            if (!std::isfinite(x[i])) {
              return absl::InvalidArgumentError(absl::StrCat(
                  "tensor '", name, "' ", ShapeString(weight.sizes()), " contains NaN or Inf"));
            }
            m = std::max(m, std::fabs(x[i]));
          }
          absmax_data[b] = m;
          const float divisor = m == 0.0f ? 1.0f : m;
          for (int64_t i = begin; i < end; ++i) {
            const float y = x[i] / divisor;
            if (format.sign_magnitude) {
              const uint8_t sign = y < 0.0f ? 8 : 0;
              codes[i] =
                  static_cast<uint8_t>(NearestCodeReference(candidates, std::fabs(y)) | sign);
            } else {
              codes[i] = NearestCodeReference(candidates, y);
            }
          }
        }
        if (!options.double_quant) {
          q.absmax = absmax;
          return q;
        }

        // Double quantization, one nested block at a time.
        const auto dynamic = SortedCandidates(Bnb4BitDynamicMap().data(), 256);
        double sum = 0.0;
        for (int64_t b = 0; b < blocks; ++b) sum += absmax_data[b];
        q.nested_offset = static_cast<float>(sum / static_cast<double>(blocks));
        const int64_t nested_size = options.nested_block_size;
        q.quantized_absmax = at::empty({blocks}, at::kByte);
        q.nested_absmax = at::empty({q.nested_blocks()}, at::kFloat);
        uint8_t* quantized = q.quantized_absmax.data_ptr<uint8_t>();
        float* nested = q.nested_absmax.data_ptr<float>();
        for (int64_t j = 0; j < q.nested_blocks(); ++j) {
          const int64_t begin = j * nested_size;
          const int64_t end = std::min(blocks, begin + nested_size);
          float m = 0.0f;
          for (int64_t b = begin; b < end; ++b) {
            m = std::max(m, std::fabs(absmax_data[b] - q.nested_offset));
          }
          nested[j] = m;
          const float divisor = m == 0.0f ? 1.0f : m;
          for (int64_t b = begin; b < end; ++b) {
            quantized[b] =
                NearestCodeReference(dynamic, (absmax_data[b] - q.nested_offset) / divisor);
          }
        }
        return q;
      });
}

at::Tensor DequantizeBnb4BitReference(const Bnb4BitTensor& q, at::ScalarType dtype) {
  const Bnb4BitFormat& format = FindBnb4BitFormat(q.options.type);
  const std::array<float, 256>& dynamic = Bnb4BitDynamicMap();
  const int64_t n = q.numel();
  const int64_t blocks = q.blocks();
  std::vector<float> absmax(blocks);
  if (q.options.double_quant) {
    at::Tensor quantized = q.quantized_absmax.to(at::kCPU).contiguous();
    at::Tensor nested = q.nested_absmax.to(at::kCPU).contiguous();
    for (int64_t b = 0; b < blocks; ++b) {
      const float scaled = dynamic[quantized.data_ptr<uint8_t>()[b]] *
                           nested.data_ptr<float>()[b / q.options.nested_block_size];
      absmax[b] = scaled + q.nested_offset;
    }
  } else {
    at::Tensor plain = q.absmax.to(at::kCPU).contiguous();
    for (int64_t b = 0; b < blocks; ++b) absmax[b] = plain.data_ptr<float>()[b];
  }
  at::Tensor codes = q.codes.to(at::kCPU).contiguous();
  at::Tensor result = at::empty({n}, at::kFloat);
  for (int64_t i = 0; i < n; ++i) {
    result.data_ptr<float>()[i] =
        format.quant_map[codes.data_ptr<uint8_t>()[i]] * absmax[i / q.options.block_size];
  }
  return result.to(dtype).view(q.shape);
}

}  // namespace compress::engine
