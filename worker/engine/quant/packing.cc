// Bit-stream packing with ATen ops. The stream repeats every 32 codes (one
// BitStreamBlock of `bits` words), so the work is a loop over the 32 code
// positions of a block, each a whole-tensor op over all blocks and columns.
#include "worker/engine/quant/packing.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/engine/util/torch_status.h"

namespace compress::engine {
namespace {

constexpr int64_t kBlockCodes = 32;
constexpr int64_t kWordMask = 0xFFFFFFFFll;

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// int64 holding an unsigned 32-bit pattern -> int32 with the same bits,
// spelled out rather than relying on narrowing conversion.
at::Tensor WordsToInt32(const at::Tensor& words) {
  return at::where(words >= (int64_t{1} << 31), words - (int64_t{1} << 32), words).to(at::kInt);
}

at::Tensor GroupIndex(int64_t in_features, int64_t group_size) {
  return at::arange(in_features, at::kLong).div_(group_size, "floor").to(at::kInt);
}

}  // namespace

const PackedFormat* FindPackedFormat(int bits) {
  for (const PackedFormat& row : kPackedFormats) {
    if (row.bits == bits) return &row;
  }
  return nullptr;
}

at::Tensor PackBitStream(const at::Tensor& codes, int bits) {
  TORCH_CHECK(codes.dim() == 2, "PackBitStream: codes must be 2-D");
  TORCH_CHECK(bits >= 1 && bits <= 32, "PackBitStream: bits must be in 1..32");
  const int64_t n = codes.size(0);
  const int64_t m = codes.size(1);
  const int64_t blocks = (n + kBlockCodes - 1) / kBlockCodes;
  at::Tensor padded = codes.to(at::kLong);
  if (blocks * kBlockCodes != n) {
    padded = at::constant_pad_nd(padded, {0, 0, 0, blocks * kBlockCodes - n}, 0);
  }
  at::Tensor by_position = padded.view({blocks, kBlockCodes, m});
  at::Tensor words = at::zeros({blocks, bits, m}, padded.options());
  for (int64_t k = 0; k < kBlockCodes; ++k) {
    const int64_t first_bit = k * bits;
    const int64_t word = first_bit / 32;
    const int64_t shift = first_bit % 32;
    at::Tensor code = by_position.select(1, k);
    words.select(1, word).bitwise_or_(at::bitwise_left_shift(code, shift).bitwise_and_(kWordMask));
    if (shift + bits > 32) {  // the code straddles two words
      words.select(1, word + 1).bitwise_or_(at::bitwise_right_shift(code, 32 - shift));
    }
  }
  return WordsToInt32(words.view({blocks * bits, m}).narrow(0, 0, PackedRows(n, bits)));
}

at::Tensor UnpackBitStream(const at::Tensor& packed, int bits, int64_t n) {
  TORCH_CHECK(packed.dim() == 2, "UnpackBitStream: packed must be 2-D");
  TORCH_CHECK(bits >= 1 && bits <= 8, "UnpackBitStream: bits must be in 1..8");
  TORCH_CHECK(packed.size(0) == PackedRows(n, bits), "UnpackBitStream: ", packed.size(0),
              " rows do not hold ", n, " codes of ", bits, " bits");
  const int64_t m = packed.size(1);
  const int64_t blocks = (n + kBlockCodes - 1) / kBlockCodes;
  at::Tensor words = packed.to(at::kLong).bitwise_and_(kWordMask);
  if (words.size(0) != blocks * bits) {
    words = at::constant_pad_nd(words, {0, 0, 0, blocks * bits - words.size(0)}, 0);
  }
  words = words.view({blocks, bits, m});
  const int64_t code_mask = (int64_t{1} << bits) - 1;
  at::Tensor codes = at::empty({blocks, kBlockCodes, m}, words.options());
  for (int64_t k = 0; k < kBlockCodes; ++k) {
    const int64_t first_bit = k * bits;
    const int64_t word = first_bit / 32;
    const int64_t shift = first_bit % 32;
    at::Tensor code = at::bitwise_right_shift(words.select(1, word), shift);
    if (shift + bits > 32) {
      code.bitwise_or_(at::bitwise_left_shift(words.select(1, word + 1), 32 - shift));
    }
    codes.select(1, k).copy_(code.bitwise_and_(code_mask));
  }
  return codes.view({blocks * kBlockCodes, m}).narrow(0, 0, n).to(at::kByte);
}

std::vector<SafetensorsTensorSpec> PackedLinearSpecs(const std::string& prefix,
                                                     int64_t out_features, int64_t in_features,
                                                     int bits, int64_t group_size) {
  const int64_t groups = in_features / group_size;
  return {
      {prefix + kQweightSuffix,
       SafetensorsDtype::kI32,
       {PackedRows(in_features, bits), out_features}},
      {prefix + kQzerosSuffix, SafetensorsDtype::kI32, {groups, PackedRows(out_features, bits)}},
      {prefix + kScalesSuffix, SafetensorsDtype::kF16, {groups, out_features}},
      {prefix + kGidxSuffix, SafetensorsDtype::kI32, {in_features}},
  };
}

int64_t PackedLinearBytes(int64_t out_features, int64_t in_features, int bits, int64_t group_size) {
  int64_t total = 0;
  for (const SafetensorsTensorSpec& spec :
       PackedLinearSpecs("", out_features, in_features, bits, group_size)) {
    int64_t bytes = DtypeBytes(spec.dtype);
    for (int64_t d : spec.shape) bytes *= d;
    total += bytes;
  }
  return total;
}

absl::StatusOr<PackedLinear> PackLinear(const QuantizedTensor& q, absl::string_view name) {
  const PackedFormat* format = FindPackedFormat(q.bits);
  if (format == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': no packed format for ", q.bits, " bits"));
  }
  RETURN_IF_ERROR(ValidateQuantized(q, name));
  return CatchTorchErrors(
      absl::StrCat("pack tensor '", name, "'"), [&]() -> absl::StatusOr<PackedLinear> {
        const int64_t out = q.out_features();
        const int64_t in = q.in_features();
        const int64_t mask = (int64_t{1} << q.bits) - 1;
        PackedLinear packed;
        packed.qweight = PackBitStream(q.codes.to(at::kCPU).t(), q.bits);
        at::Tensor stored_zeros =
            q.zeros.to(at::kCPU, at::kLong).sub_(format->zero_offset).bitwise_and_(mask);
        // [out, groups] packed along out, then stored as GPTQ's [groups, packed out].
        packed.qzeros = PackBitStream(stored_zeros, q.bits).t().contiguous();
        packed.scales = q.scales.to(at::kCPU).t().contiguous();
        packed.g_idx = GroupIndex(in, q.group_size);

        // The format's sizes, checked before anything reaches a file.
        const std::vector<SafetensorsTensorSpec> specs =
            PackedLinearSpecs(std::string(name), out, in, q.bits, q.group_size);
        RETURN_IF_ERROR(CheckTensor(packed.qweight, at::kInt, specs[0].shape, "qweight", name));
        RETURN_IF_ERROR(CheckTensor(packed.qzeros, at::kInt, specs[1].shape, "qzeros", name));
        RETURN_IF_ERROR(CheckTensor(packed.scales, at::kHalf, specs[2].shape, "scales", name));
        RETURN_IF_ERROR(CheckTensor(packed.g_idx, at::kInt, specs[3].shape, "g_idx", name));
        const int64_t bytes = packed.qweight.nbytes() + packed.qzeros.nbytes() +
                              packed.scales.nbytes() + packed.g_idx.nbytes();
        if (bytes != PackedLinearBytes(out, in, q.bits, q.group_size)) {
          return absl::InternalError(
              absl::StrCat("tensor '", name, "': packed ", bytes, " bytes, the format says ",
                           PackedLinearBytes(out, in, q.bits, q.group_size)));
        }
        return packed;
      });
}

absl::StatusOr<QuantizedTensor> UnpackLinear(const PackedLinear& packed, int bits,
                                             absl::string_view name) {
  const PackedFormat* format = FindPackedFormat(bits);
  if (format == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': no packed format for ", bits, " bits"));
  }
  if (!packed.g_idx.defined() || packed.g_idx.dim() != 1 || !packed.scales.defined() ||
      packed.scales.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': g_idx must be 1-D and scales 2-D"));
  }
  const int64_t in = packed.g_idx.size(0);
  const int64_t groups = packed.scales.size(0);
  const int64_t out = packed.scales.size(1);
  if (groups == 0 || in % groups != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': ", groups, " groups do not divide in_features ", in));
  }
  const int64_t group_size = in / groups;
  const std::vector<SafetensorsTensorSpec> specs =
      PackedLinearSpecs(std::string(name), out, in, bits, group_size);
  RETURN_IF_ERROR(CheckTensor(packed.qweight, at::kInt, specs[0].shape, "qweight", name));
  RETURN_IF_ERROR(CheckTensor(packed.qzeros, at::kInt, specs[1].shape, "qzeros", name));
  RETURN_IF_ERROR(CheckTensor(packed.scales, at::kHalf, specs[2].shape, "scales", name));
  RETURN_IF_ERROR(CheckTensor(packed.g_idx, at::kInt, specs[3].shape, "g_idx", name));
  return CatchTorchErrors(
      absl::StrCat("unpack tensor '", name, "'"), [&]() -> absl::StatusOr<QuantizedTensor> {
        if (!packed.g_idx.to(at::kCPU).equal(GroupIndex(in, group_size))) {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor '", name, "': g_idx is not i / ", group_size,
                           " (act-order checkpoints are not supported)"));
        }
        const int64_t mask = (int64_t{1} << bits) - 1;
        QuantizedTensor q;
        q.bits = bits;
        q.group_size = group_size;
        q.codes = UnpackBitStream(packed.qweight.to(at::kCPU), bits, in).t().contiguous();
        q.zeros = UnpackBitStream(packed.qzeros.to(at::kCPU).t().contiguous(), bits, out)
                      .to(at::kLong)
                      .add_(format->zero_offset)
                      .bitwise_and_(mask)
                      .to(at::kByte)
                      .contiguous();
        q.scales = packed.scales.to(at::kCPU).t().contiguous();
        return q;
      });
}

}  // namespace compress::engine
