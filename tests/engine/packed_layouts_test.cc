// Every packed layout a job writes, read back by a decoder written here
// from the format's description alone (none of the engine's unpacking code),
// must give the dequantized checkpoint of the same job bit for bit.
//
// GPTQ (quant_method "gptq", checkpoint_format "gptq", AutoGPTQ v1): for a
// linear "<m>.weight" [out, in] with b bits and group size G (-1: in):
//   <m>.qweight int32 [in*b/32, out]: for column j, code i occupies bits
//       i*b .. i*b+b-1 of the column's words read as one little-endian bit
//       stream (word r holds stream bits 32r..32r+31, low bit first);
//   <m>.qzeros  int32 [groups, out*b/32]: the zero points of group g as the
//       same kind of stream along the output channels, each stored minus 1
//       (mod 2^b);
//   <m>.scales  float16 [groups, out];  <m>.g_idx int32 [in]: group of input i;
//   weight[j][i] = (code - zero) * scale in float32, rounded to the dtype.
// quantization_config.dynamic (GPTQModel): "+:<regex>" overrides bits,
// group_size, sym for matching modules; "-:<regex>" modules are not quantized.
//
// bitsandbytes 4-bit (quant_method "bitsandbytes", Linear4bit's state dict):
// for a weight W of n elements, W.quant_state.bitsandbytes__<type> is a
// uint8 tensor holding JSON {quant_type, blocksize, dtype, shape, and with
// double quantization nested_blocksize, nested_offset}; W is uint8 [n/2, 1],
// element k in byte k/2, the high nibble for even k; W.quant_map float32
// [16] maps a code to a value; W.absmax is float32 per block of blocksize
// elements, or with double quantization uint8 codes into W.nested_quant_map
// (float32 [256]) scaled by W.nested_absmax (float32 per nested block) plus
// nested_offset; element k = quant_map[code] * absmax[k / blocksize] in
// float32, rounded to dtype.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>

#include "absl/strings/match.h"
#include "compress/v1/compress.pb.h"
#include "tests/engine/test_util.h"
#include "worker/engine/model/random_model.h"
#include "worker/engine/model/safetensors_reader.h"
#include "worker/engine/recipe/runner.h"

namespace compress::engine {
namespace {

namespace v1 = compress::v1;
using Json = nlohmann::json;

// ------------------------------------------------------------ plain decoding

template <typename T>
T ReadLittleEndian(absl::string_view bytes, size_t index) {
  T value;
  std::memcpy(&value, bytes.data() + index * sizeof(T), sizeof(T));
  return value;
}

float HalfToFloat(uint16_t h) {
  const int sign = h >> 15;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 -> the checkpoint's dtype, round to nearest even, as raw bytes.
std::string Encode(float value, const std::string& dtype) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (dtype == "F32") return std::string(reinterpret_cast<const char*>(&bits), 4);
  if (dtype == "BF16") {
    const uint16_t rounded = static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    return std::string(reinterpret_cast<const char*>(&rounded), 2);
  }
  ADD_FAILURE() << "the test's models are F32 or BF16, not " << dtype;
  return "";
}

// Stream bits [first, first + count) of a column of int32 words, where word
// r of the column is words[r * stride + column].
uint32_t StreamBits(absl::string_view words, int64_t stride, int64_t column, int64_t first,
                    int count) {
  uint32_t value = 0;
  for (int k = 0; k < count; ++k) {
    const int64_t bit = first + k;
    const uint32_t word = ReadLittleEndian<uint32_t>(words, (bit / 32) * stride + column);
    value |= ((word >> (bit % 32)) & 1u) << k;
  }
  return value;
}

struct Grid {
  int bits = 0;
  int64_t group_size = 0;
};

// The grid of `module` per quantization_config and its dynamic rules;
// nullopt for a module the rules leave unquantized.
std::optional<Grid> GridOf(const Json& config, const std::string& module) {
  Grid grid{config["bits"].get<int>(), config["group_size"].get<int64_t>()};
  if (!config.contains("dynamic")) return grid;
  for (const auto& [rule, overrides] : config["dynamic"].items()) {
    const bool negative = absl::StartsWith(rule, "-:");
    const std::string pattern = rule.substr(2);
    if (!std::regex_search(module, std::regex(pattern))) continue;
    if (negative) return std::nullopt;
    if (overrides.contains("bits")) grid.bits = overrides["bits"].get<int>();
    if (overrides.contains("group_size")) grid.group_size = overrides["group_size"].get<int64_t>();
  }
  return grid;
}

// Decodes every tensor of a GPTQ-layout folder and compares it with the
// dequantized folder's bytes. Returns how many linears were decoded.
int ExpectGptqLayoutDecodesToDequantized(const std::string& packed_dir,
                                         const std::string& dequantized_dir) {
  const Json config = Json::parse(testing::ReadBytes(packed_dir + "/config.json"));
  const Json& q = config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "gptq");
  EXPECT_EQ(q["checkpoint_format"], "gptq");
  EXPECT_EQ(q["desc_act"], false);
  const SafetensorsCheckpoint packed = *SafetensorsCheckpoint::Open(packed_dir);
  const SafetensorsCheckpoint dequantized = *SafetensorsCheckpoint::Open(dequantized_dir);
  int decoded = 0;
  for (const CheckpointTensor& tensor : dequantized.tensors()) {
    const std::string& name = tensor.info.name;
    SCOPED_TRACE(name);
    const absl::string_view expected = *dequantized.RawBytes(name);
    if (packed.Find(name) != nullptr) {  // kept whole
      EXPECT_EQ(*packed.RawBytes(name), expected);
      if (absl::EndsWith(name, "_proj.weight")) {
        EXPECT_FALSE(GridOf(q, name.substr(0, name.size() - 7)).has_value())
            << "an unquantized linear is declared so in dynamic";
      }
      continue;
    }
    const std::string module = name.substr(0, name.size() - std::string(".weight").size());
    const std::optional<Grid> grid = GridOf(q, module);
    EXPECT_TRUE(grid.has_value());
    if (!grid) continue;
    const int64_t out = tensor.info.shape[0], in = tensor.info.shape[1];
    const int bits = grid->bits;
    const int64_t group_size = grid->group_size == -1 ? in : grid->group_size;
    const absl::string_view qweight = *packed.RawBytes(module + ".qweight");
    const absl::string_view qzeros = *packed.RawBytes(module + ".qzeros");
    const absl::string_view scales = *packed.RawBytes(module + ".scales");
    const absl::string_view g_idx = *packed.RawBytes(module + ".g_idx");
    EXPECT_EQ(packed.Find(module + ".qweight")->info.shape,
              (std::vector<int64_t>{(in * bits + 31) / 32, out}));
    const int64_t zero_words = (out * bits + 31) / 32;
    EXPECT_EQ(packed.Find(module + ".qzeros")->info.shape,
              (std::vector<int64_t>{in / group_size, zero_words}));
    std::string decoded_bytes;
    const uint32_t mask = (1u << bits) - 1;
    for (int64_t j = 0; j < out; ++j) {
      for (int64_t i = 0; i < in; ++i) {
        const int32_t g = ReadLittleEndian<int32_t>(g_idx, i);
        EXPECT_EQ(g, i / group_size);
        const uint32_t code = StreamBits(qweight, out, j, i * bits, bits);
        const uint32_t zero = (StreamBits(qzeros.substr(g * zero_words * 4), 1, 0, j * bits, bits) + 1) & mask;
        const float scale = HalfToFloat(ReadLittleEndian<uint16_t>(scales, g * out + j));
        const float value = (static_cast<float>(code) - static_cast<float>(zero)) * scale;
        decoded_bytes += Encode(value, DtypeName(tensor.info.dtype));
      }
    }
    EXPECT_TRUE(decoded_bytes == expected) << "decoded values differ from the dequantized checkpoint";
    ++decoded;
  }
  return decoded;
}

std::string DtypeOfTorchName(const std::string& torch_name) {
  if (torch_name == "bfloat16") return "BF16";
  if (torch_name == "float32") return "F32";
  ADD_FAILURE() << "unexpected dtype " << torch_name;
  return "";
}

// Decodes every bitsandbytes 4-bit weight of `packed_dir` and compares it
// with the dequantized folder's bytes; the rest must be copied as is.
// Returns how many weights were decoded.
int ExpectBnb4BitLayoutDecodesToDequantized(const std::string& packed_dir,
                                            const std::string& dequantized_dir) {
  const Json config = Json::parse(testing::ReadBytes(packed_dir + "/config.json"));
  const Json& q = config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "bitsandbytes");
  EXPECT_EQ(q["load_in_4bit"], true);
  const SafetensorsCheckpoint packed = *SafetensorsCheckpoint::Open(packed_dir);
  const SafetensorsCheckpoint dequantized = *SafetensorsCheckpoint::Open(dequantized_dir);
  int decoded = 0;
  for (const CheckpointTensor& tensor : dequantized.tensors()) {
    const std::string& name = tensor.info.name;
    SCOPED_TRACE(name);
    const absl::string_view expected = *dequantized.RawBytes(name);
    std::string state_name;
    for (const char* type : {"nf4", "fp4"}) {
      const std::string candidate = name + ".quant_state.bitsandbytes__" + type;
      if (packed.Find(candidate) != nullptr) state_name = candidate;
    }
    if (state_name.empty()) {
      EXPECT_EQ(*packed.RawBytes(name), expected);
      if (absl::EndsWith(name, "_proj.weight")) {
        const std::string module = name.substr(0, name.size() - 7);
        EXPECT_NE(std::find(q["llm_int8_skip_modules"].begin(), q["llm_int8_skip_modules"].end(),
                            module),
                  q["llm_int8_skip_modules"].end())
            << "an unquantized linear is listed as skipped";
      }
      continue;
    }
    const Json state = Json::parse(std::string(*packed.RawBytes(state_name)));
    EXPECT_EQ(state["quant_type"], q["bnb_4bit_quant_type"]);
    EXPECT_EQ(state["shape"].get<std::vector<int64_t>>(), tensor.info.shape);
    const std::string dtype = DtypeOfTorchName(state["dtype"].get<std::string>());
    EXPECT_EQ(dtype, DtypeName(tensor.info.dtype));
    const int64_t blocksize = state["blocksize"].get<int64_t>();
    const bool nested = state.contains("nested_offset");
    EXPECT_EQ(nested, q["bnb_4bit_use_double_quant"].get<bool>());
    const absl::string_view codes = *packed.RawBytes(name);
    const absl::string_view quant_map = *packed.RawBytes(name + ".quant_map");
    const absl::string_view absmax = *packed.RawBytes(name + ".absmax");
    const int64_t n = tensor.info.NumElements();
    EXPECT_EQ(packed.Find(name)->info.shape, (std::vector<int64_t>{(n + 1) / 2, 1}));
    auto block_absmax = [&](int64_t block) -> float {
      if (!nested) return ReadLittleEndian<float>(absmax, block);
      const int64_t nested_block = block / state["nested_blocksize"].get<int64_t>();
      const uint8_t code = static_cast<uint8_t>(absmax[block]);
      const float mapped = ReadLittleEndian<float>(*packed.RawBytes(name + ".nested_quant_map"), code);
      const float scale = ReadLittleEndian<float>(*packed.RawBytes(name + ".nested_absmax"), nested_block);
      return mapped * scale + state["nested_offset"].get<float>();
    };
    std::string decoded_bytes;
    for (int64_t k = 0; k < n; ++k) {
      const uint8_t byte = static_cast<uint8_t>(codes[k / 2]);
      const int code = k % 2 == 0 ? byte >> 4 : byte & 0x0f;
      const float value = ReadLittleEndian<float>(quant_map, code) * block_absmax(k / blocksize);
      decoded_bytes += Encode(value, dtype);
    }
    EXPECT_TRUE(decoded_bytes == expected) << "decoded values differ from the dequantized checkpoint";
    ++decoded;
  }
  return decoded;
}

// ------------------------------------------------------------------ jobs

class PackedLayoutTest : public ::testing::Test {
 protected:
  void SetUp() override {
    RandomModelOptions options;
    options.dtype = SafetensorsDtype::kBF16;
    options.seed = 7;
    options.init_std = 0.1;
    model_dir_ = dir_ / "model";
    ASSERT_TRUE(WriteRandomLlamaModel(options, model_dir_).ok());
    // Calibration as token ids: no tokenizer needed.
    std::string ids;
    at::manual_seed(8);
    const at::Tensor tokens = at::randint(0, options.vocab_size, {4096}, at::kInt);
    ids.assign(static_cast<const char*>(tokens.data_ptr()), tokens.nbytes());
    calibration_ = dir_ / "calibration.tokens";
    testing::WriteBytes(calibration_, ids);
  }

  v1::JobSpec Spec() const {
    v1::JobSpec spec;
    spec.add_outputs(v1::DEQUANTIZED_SAFETENSORS);
    spec.add_outputs(v1::PACKED_SAFETENSORS);
    spec.mutable_calibration()->set_path(calibration_);
    spec.mutable_calibration()->set_num_samples(4);
    spec.mutable_calibration()->set_sequence_length(32);
    return spec;
  }

  // Runs the job and decodes its packed output; returns the decoded count.
  int RunAndDecode(const v1::JobSpec& spec, const std::string& label, bool bnb = false) {
    RunOptions options;
    options.model_path = model_dir_;
    options.output_dir = dir_ / label;
    absl::StatusOr<RunResult> result = RunJob(spec, options, {});
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return 0;
    const std::string packed = options.output_dir + "/packed";
    const std::string dequantized = options.output_dir + "/dequantized";
    return bnb ? ExpectBnb4BitLayoutDecodesToDequantized(packed, dequantized)
               : ExpectGptqLayoutDecodesToDequantized(packed, dequantized);
  }

  testing::TempDir dir_;
  std::string model_dir_;
  std::string calibration_;
};

constexpr int kLinears = 2 * 7;  // the random model's two blocks

TEST_F(PackedLayoutTest, RtnGptqAwqAndHqqResultsDecodeToTheDequantizedCheckpoint) {
  struct Case {
    std::string label;
    std::function<void(v1::Stage*)> set;
  };
  const Case cases[] = {
      {"rtn-w4-g32", [](v1::Stage* s) {
         auto* m = s->mutable_rtn();
         m->set_bits(4);
         m->set_group_size(32);
       }},
      {"gptq-w3-channel-act-order", [](v1::Stage* s) {
         auto* m = s->mutable_gptq();
         m->set_bits(3);
         m->set_symmetric(true);
         m->set_act_order(true);
       }},
      {"awq-w4-g32-clip", [](v1::Stage* s) {
         auto* m = s->mutable_awq();
         m->set_bits(4);
         m->set_group_size(32);
         m->set_clip(true);
       }},
      {"awq-gptq-w2-g16", [](v1::Stage* s) {
         auto* m = s->mutable_awq();
         m->set_bits(2);
         m->set_group_size(16);
         m->set_quantizer(v1::AWQ_QUANTIZER_GPTQ);
       }},
      {"hqq-w2-g32", [](v1::Stage* s) {
         auto* m = s->mutable_hqq();
         m->set_bits(2);
         m->set_group_size(32);
       }},
      {"rtn-w8-channel", [](v1::Stage* s) {
         auto* m = s->mutable_rtn();
         m->set_bits(8);
         m->set_symmetric(true);
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.label);
    v1::JobSpec spec = Spec();
    c.set(spec.add_stages());
    EXPECT_EQ(RunAndDecode(spec, c.label), kLinears);
  }
}

TEST_F(PackedLayoutTest, MixedSettingsPerLayerAreDeclaredAsDynamicOverrides) {
  v1::JobSpec spec = Spec();
  v1::GptqStage* most = spec.add_stages()->mutable_gptq();
  most->set_bits(4);
  most->set_group_size(32);
  most->add_exclude("down_proj");
  most->add_exclude("layers\\.1\\.self_attn\\.o_proj");  // left alone
  v1::RtnStage* down = spec.add_stages()->mutable_rtn();
  down->set_bits(8);
  down->set_symmetric(true);
  down->add_include("down_proj");
  EXPECT_EQ(RunAndDecode(spec, "mixed"), kLinears - 1);

  const Json q = Json::parse(testing::ReadBytes(dir_ / "mixed/packed/config.json"))["quantization_config"];
  EXPECT_EQ(q["bits"], 4);
  EXPECT_EQ(q["group_size"], 32);
  EXPECT_EQ(q["dynamic"].size(), 3u);
  const Json& layer0_down = q["dynamic"]["+:^model\\.layers\\.0\\.mlp\\.down_proj$"];
  EXPECT_EQ(layer0_down["bits"], 8);
  EXPECT_EQ(layer0_down["group_size"], -1);
  EXPECT_EQ(layer0_down["sym"], true);
  EXPECT_TRUE(q["dynamic"].contains("-:^model\\.layers\\.1\\.self_attn\\.o_proj$"));
  // AutoGPTQ's own file says the same.
  const Json quantize_config = Json::parse(testing::ReadBytes(dir_ / "mixed/packed/quantize_config.json"));
  EXPECT_EQ(quantize_config["dynamic"], q["dynamic"]);
}

TEST_F(PackedLayoutTest, Bnb4BitResultsDecodeToTheDequantizedCheckpoint) {
  v1::JobSpec nf4 = Spec();
  v1::Bnb4BitStage* stage = nf4.add_stages()->mutable_bnb_4bit();
  stage->set_double_quant(true);
  stage->add_exclude("layers\\.0\\.mlp\\.gate_proj");
  EXPECT_EQ(RunAndDecode(nf4, "nf4-double-quant", /*bnb=*/true), kLinears - 1);
  const Json q =
      Json::parse(testing::ReadBytes(dir_ / "nf4-double-quant/packed/config.json"))["quantization_config"];
  EXPECT_EQ(q["bnb_4bit_quant_type"], "nf4");
  EXPECT_EQ(q["bnb_4bit_compute_dtype"], "bfloat16");
  EXPECT_EQ(q["llm_int8_skip_modules"], Json::parse(R"(["model.layers.0.mlp.gate_proj", "lm_head"])"));
  EXPECT_FALSE(std::filesystem::exists(dir_ / "nf4-double-quant/packed/quantize_config.json"));

  v1::JobSpec fp4 = Spec();
  stage = fp4.add_stages()->mutable_bnb_4bit();
  stage->set_type(v1::BNB_4BIT_FP4);
  stage->set_block_size(128);
  EXPECT_EQ(RunAndDecode(fp4, "fp4-b128", /*bnb=*/true), kLinears);

  // One checkpoint, one loader: bitsandbytes and GPTQ results do not mix.
  v1::JobSpec mixed = Spec();
  mixed.add_stages()->mutable_bnb_4bit()->add_exclude("down_proj");
  v1::RtnStage* rtn = mixed.add_stages()->mutable_rtn();
  rtn->set_bits(4);
  rtn->add_include("down_proj");
  RunOptions options;
  options.model_path = model_dir_;
  options.output_dir = dir_ / "mixed";
  const absl::Status status = RunJob(mixed, options, {}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "need different loaders")) << status;
}

}  // namespace
}  // namespace compress::engine
