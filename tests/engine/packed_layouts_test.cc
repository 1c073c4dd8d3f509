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
#include <ATen/ATen.h>
#include <gtest/gtest.h>

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
  int RunAndDecode(const v1::JobSpec& spec, const std::string& label) {
    RunOptions options;
    options.model_path = model_dir_;
    options.output_dir = dir_ / label;
    absl::StatusOr<RunResult> result = RunJob(spec, options, {});
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return 0;
    return ExpectGptqLayoutDecodesToDequantized(options.output_dir + "/packed",
                                                options.output_dir + "/dequantized");
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

}  // namespace
}  // namespace compress::engine
