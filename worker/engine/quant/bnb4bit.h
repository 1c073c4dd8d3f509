// bitsandbytes' 4-bit weight formats, NF4 and FP4 (QLoRA, Dettmers et al.
// 2023), as pure tensor functions, and the tensors bitsandbytes and
// transformers store for a Linear4bit weight.
//
// Quantization (what bitsandbytes.functional.quantize_4bit computes):
//   the weight, any shape, is flattened row-major and cut into blocks of
//   block_size consecutive values (the last block may be partial);
//   absmax[b]  = max |x| over block b, float32;
//   code[i]    = the entry of the 16-value table nearest to x[i] / absmax[b]
//                (a zero block keeps absmax 0 and gets the code of 0.0);
//   value[i]   = table[code[i]] * absmax[b], in float32, cast once to the
//                output dtype.
// "Nearest" is made exact as follows: between two neighbouring table values
// the boundary is their float32 midpoint (a + b) * 0.5f, and x exactly on a
// boundary takes the entry below it, as the `x > threshold` decision trees of
// bitsandbytes' dQuantizeNF4 / dQuantizeFP4 kernels do. FP4 codes are
// sign-magnitude (bit 3 is the sign): the code is (x < 0 ? 8 : 0) | the
// nearest magnitude, so a tiny negative value gets code 8 (-0), as in the
// kernel. x / absmax is a true float32 division (the kernel multiplies by
// 1 / absmax, which can differ by an ulp at a boundary; any code a loader
// reads back dequantizes the same way).
//
// Double quantization (compress_statistics=True, "bnb_4bit_use_double_quant"):
//   offset          = mean of absmax (accumulated in float64, rounded to float32);
//   a[b]            = absmax[b] - offset, float32;
//   a is quantized blockwise again, nested_block_size values per block, with
//   bitsandbytes' 256-entry signed dynamic map (create_dynamic_map): one
//   float32 nested_absmax per nested block and one uint8 code per absmax;
//   absmax as read back = nested_map[q] * nested_absmax + offset (float32
//   multiply, then float32 add). The 4-bit codes are computed with the exact
//   absmax, before it is compressed (as bitsandbytes does).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors_header.h"

namespace compress::engine {

enum class Bnb4BitType { kNf4, kFp4 };

// One row per 4-bit data type. The 16 values are bitsandbytes'
// get_4bit_type(name) in code order, normalized by their largest magnitude,
// exactly as float32 holds them; they are also what "<weight>.quant_map"
// stores.
struct Bnb4BitFormat {
  Bnb4BitType type;
  const char* quant_type;  // "nf4" / "fp4": quant_state's quant_type and key suffix
  std::array<float, 16> quant_map;
  // FP4: bit 3 of a code is the sign, bits 0..2 name the magnitude
  // (quant_map[c | 8] == -quant_map[c]). NF4: codes are sorted by value.
  bool sign_magnitude;
  uint8_t zero_code;  // the code of 0.0: zero blocks and the padding nibble
};

inline constexpr Bnb4BitFormat kBnb4BitFormats[] = {
    // NF4: normal-distribution quantiles (functional.py get_4bit_type("nf4")).
    {Bnb4BitType::kNf4,
     "nf4",
     {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f},
     false,
     7},
    // FP4 (1 sign, 2 exponent, 1 mantissa bits; bias 3): codes 0..7 hold
    // 0, 0.0625, 8, 12, 4, 6, 2, 3, codes 8..15 their negations (the source
    // writes -0 as a Python int, which is +0.0), all divided by 12.
    {Bnb4BitType::kFp4,
     "fp4",
     {0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f,
      3.0f / 12.0f, 0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f,
      -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f},
     true,
     0},
};

const Bnb4BitFormat& FindBnb4BitFormat(Bnb4BitType type);

// bitsandbytes' create_dynamic_map(signed=True), the "nested_quant_map" of
// double quantization: for i in 0..6, the 2^i midpoints of
// linspace(0.1, 1, 2^i + 1), times 10^(i-6), with both signs; plus 0 and 1;
// sorted. 256 strictly increasing float32 values from -0.99296874 to 1, with
// 0 at index 127. Built once, in float32 step by step as the Python source
// does (torch's scalar linspace formula; its SIMD path can differ by an ulp
// on some CPUs, which is why parsing accepts a stored map within 1e-6).
const std::array<float, 256>& Bnb4BitDynamicMap();

struct Bnb4BitOptions {
  Bnb4BitType type = Bnb4BitType::kNf4;
  // Weights per absmax: a power of two in 64..4096. (bitsandbytes' newest
  // CUDA builds also take 32; its older releases and its CPU and ROCm paths
  // do not, so files with 32 would not load everywhere.)
  int64_t block_size = 64;
  bool double_quant = false;
  // Absmax values per nested block (bitsandbytes always uses 256); a power
  // of two in 64..4096. Only checked when double_quant is set.
  int64_t nested_block_size = 256;
};

// INVALID_ARGUMENT naming the field: a block size that is not a power of two
// in 64..4096, an unknown type.
absl::Status ValidateBnb4BitOptions(const Bnb4BitOptions& options);

// A weight in bitsandbytes' 4-bit form, before packing.
struct Bnb4BitTensor {
  at::Tensor codes;  // uint8 [n]: one code (0..15) per weight, row-major over `shape`
  // Plain: float32 [blocks], finite, >= 0. Undefined with double quant.
  at::Tensor absmax;
  // Double quant only (else undefined): uint8 [blocks] codes into
  // Bnb4BitDynamicMap(), float32 [nested_blocks] finite >= 0, and the offset.
  at::Tensor quantized_absmax;
  at::Tensor nested_absmax;
  float nested_offset = 0.0f;
  std::vector<int64_t> shape;         // the original weight's shape
  at::ScalarType dtype = at::kFloat;  // the original weight's dtype (F32, F16, BF16)
  Bnb4BitOptions options;

  int64_t numel() const;  // product of shape
  int64_t blocks() const { return (numel() + options.block_size - 1) / options.block_size; }
  int64_t nested_blocks() const {
    return (blocks() + options.nested_block_size - 1) / options.nested_block_size;
  }
};

// How the fast path computes the 4-bit codes. kAuto: on the CPU a C++ loop
// over blocks (parallel, vectorizing: about 10x faster there than ATen's
// bucketize), on other devices ATen ops. kAten: ATen ops everywhere, so that
// tests check the device path against the reference on the CPU too. The
// nested (8-bit) quantization always uses ATen ops.
enum class Bnb4BitKernel { kAuto, kAten };

// The fast path, on the weight's device. `weight` is an F32, F16 or BF16
// tensor of any shape with 1 <= numel < 2^31 (bitsandbytes indexes weights
// with int32). INVALID_ARGUMENT naming the tensor (and its shape) for NaN or
// Inf, another dtype, an empty or oversized tensor, bad options.
absl::StatusOr<Bnb4BitTensor> QuantizeBnb4Bit(const at::Tensor& weight,
                                              const Bnb4BitOptions& options, absl::string_view name,
                                              Bnb4BitKernel kernel = Bnb4BitKernel::kAuto);

// The weights as a loader reads them back, shaped like the original, in
// `dtype`. ATen ops on the tensors' device.
at::Tensor DequantizeBnb4Bit(const Bnb4BitTensor& q, at::ScalarType dtype);

// The absmax a loader uses, float32 [blocks]: `absmax`, or with double quant
// nested_map[quantized_absmax] * nested_absmax + nested_offset.
at::Tensor DequantizeBnb4BitAbsmax(const Bnb4BitTensor& q);

// Scalar references of QuantizeBnb4Bit and DequantizeBnb4Bit: the formulas
// above one block and one element at a time on the CPU, kept apart from the
// fast path (which the tests check against them code for code).
absl::StatusOr<Bnb4BitTensor> QuantizeBnb4BitReference(const at::Tensor& weight,
                                                       const Bnb4BitOptions& options,
                                                       absl::string_view name);
at::Tensor DequantizeBnb4BitReference(const Bnb4BitTensor& q, at::ScalarType dtype);

// Checks what a quantizer produced before anything is written: options, the
// dtype, every tensor's dtype and shape, codes below 16, absmax values finite
// and >= 0, the offset finite and >= 0. INVALID_ARGUMENT naming `name`.
absl::Status ValidateBnb4Bit(const Bnb4BitTensor& q, absl::string_view name);

// ---------------------------------------------------------------------------
// Serialization: bitsandbytes' Linear4bit state dict.
//
// Linear4bit._save_to_state_dict writes the Params4bit data under the weight's
// own name and then QuantState.as_dict(packed=True) under "<weight>.": the
// tensor-valued fields as they are, and the other fields as one uint8 tensor
// holding their json.dumps() text. transformers' Bnb4BitHfQuantizer (and
// bitsandbytes' Params4bit.from_prequantized / QuantState.from_dict) read back
// every tensor whose name starts with "<weight>." and require exactly one
// "quant_state.bitsandbytes__nf4|fp4" among them. For a weight W, in order:
//
//   W                                         U8  [ceil(n/2), 1]  two codes a byte:
//                                                 the even-indexed weight in the HIGH
//                                                 nibble, the odd one in the low nibble
//                                                 (kQuantizeBlockwise ORs `code << 4`
//                                                 for element 2j); an odd n pads the
//                                                 last low nibble with zero_code
//   W.absmax                                  F32 [blocks]; U8 [blocks] with double quant
//   W.quant_map                               F32 [16]   the format's table
//   W.nested_absmax      (double quant only)  F32 [nested_blocks]
//   W.nested_quant_map   (double quant only)  F32 [256]  Bnb4BitDynamicMap()
//   W.quant_state.bitsandbytes__<nf4|fp4>     U8  [json bytes]
//
// The JSON keeps as_dict's key order and json.dumps' ", " / ": " separators:
//   {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4096, 4096]}
// and with double quant, appended:
//   "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1.234567890e-02
// dtype is str(torch dtype) without "torch." ("float32", "float16",
// "bfloat16"): the dtype a loader dequantizes to. nested_dtype is the dtype
// of the absmax that was compressed, always float32. nested_offset is written
// with printf's %.9e (10 significant digits, which round-trip any float32),
// so its length does not depend on the value and a streaming writer can
// declare the tensor's size before quantizing: bitsandbytes writes Python's
// repr() of the float instead, which json.loads reads the same.
// ---------------------------------------------------------------------------

inline constexpr char kBnbAbsmaxSuffix[] = ".absmax";
inline constexpr char kBnbQuantMapSuffix[] = ".quant_map";
inline constexpr char kBnbNestedAbsmaxSuffix[] = ".nested_absmax";
inline constexpr char kBnbNestedQuantMapSuffix[] = ".nested_quant_map";
inline constexpr char kBnbQuantStateSuffix[] = ".quant_state.bitsandbytes__";  // + quant_type

// The JSON-valued fields of bitsandbytes' QuantState, one plain struct: the
// text of "<weight>.quant_state.bitsandbytes__<type>".
struct Bnb4BitQuantState {
  std::string quant_type;  // "nf4" / "fp4"
  int64_t blocksize = 64;
  std::string dtype;  // "float32" / "float16" / "bfloat16"
  std::vector<int64_t> shape;
  bool nested = false;  // the next three keys are present
  int64_t nested_blocksize = 256;
  std::string nested_dtype = "float32";
  float nested_offset = 0.0f;  // finite, >= 0
};

// The JSON text as described above. Its length depends on everything but
// nested_offset.
std::string FormatBnb4BitQuantState(const Bnb4BitQuantState& state);
// Parses and checks a quant_state JSON text (ours, or bitsandbytes' own):
// keys from the set above only, the required ones present, the nested ones
// all or none, types and values valid. INVALID_ARGUMENT naming `name`.
absl::StatusOr<Bnb4BitQuantState> ParseBnb4BitQuantState(absl::string_view json,
                                                         absl::string_view name);

// The tensors' names, dtypes and shapes, in the order above, for a weight
// named `weight_name` (e.g. "model.layers.0.mlp.up_proj.weight") of `shape`
// and `dtype` (F32, F16 or BF16), known before any data exists.
// INVALID_ARGUMENT naming the weight for bad options, shape or dtype.
absl::StatusOr<std::vector<SafetensorsTensorSpec>> Bnb4BitTensorSpecs(
    const std::string& weight_name, const std::vector<int64_t>& shape, SafetensorsDtype dtype,
    const Bnb4BitOptions& options);

// The bytes of all those tensors together, and per weight in bits.
absl::StatusOr<int64_t> Bnb4BitSerializedBytes(const std::vector<int64_t>& shape,
                                               SafetensorsDtype dtype,
                                               const Bnb4BitOptions& options);
absl::StatusOr<double> Bnb4BitBitsPerWeight(const std::vector<int64_t>& shape,
                                            SafetensorsDtype dtype, const Bnb4BitOptions& options);

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// The named CPU tensors for a validated `q`, in spec order; every name, dtype,
// shape and the total byte size are checked against Bnb4BitTensorSpecs.
absl::StatusOr<NamedTensors> SerializeBnb4Bit(const Bnb4BitTensor& q,
                                              const std::string& weight_name);

// The inverse: finds the tensors of `weight_name` among `tensors` (others are
// ignored), checks each one's dtype and shape against the JSON's, the JSON
// itself, the stored maps against ours (within 1e-6) and the absmax values,
// and rebuilds the Bnb4BitTensor on the CPU. INVALID_ARGUMENT naming the
// tensor for anything missing, unexpected or inconsistent.
absl::StatusOr<Bnb4BitTensor> ParseBnb4Bit(const NamedTensors& tensors,
                                           const std::string& weight_name);

}  // namespace compress::engine
