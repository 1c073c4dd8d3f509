// The GGUF tensor types this project reads and writes: ggml's type ids and
// block geometry (ggml.h's enum ggml_type and its type traits). One row per
// type; the quantizers (worker/engine/gguf/) and the file reader/writer
// (common/gguf_file.h) both use this table. No LibTorch here, so compressctl
// can inspect files.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace compress {

// ggml_type values, as stored in a GGUF tensor info.
enum class GgufType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
};

struct GgufTypeInfo {
  GgufType type;
  const char* name;        // as llama.cpp prints it: "Q4_K", "F16", ...
  int64_t block_elements;  // weights per block (1 for F32/F16/BF16)
  int64_t block_bytes;     // bytes per block
};

inline constexpr GgufTypeInfo kGgufTypes[] = {
    {GgufType::kF32, "F32", 1, 4},
    {GgufType::kF16, "F16", 1, 2},
    {GgufType::kBF16, "BF16", 1, 2},
    {GgufType::kQ8_0, "Q8_0", 32, 34},
    {GgufType::kQ4_0, "Q4_0", 32, 18},
    {GgufType::kQ4_1, "Q4_1", 32, 20},
    {GgufType::kQ5_0, "Q5_0", 32, 22},
    {GgufType::kQ5_1, "Q5_1", 32, 24},
    {GgufType::kQ2_K, "Q2_K", 256, 84},
    {GgufType::kQ3_K, "Q3_K", 256, 110},
    {GgufType::kQ4_K, "Q4_K", 256, 144},
    {GgufType::kQ5_K, "Q5_K", 256, 176},
    {GgufType::kQ6_K, "Q6_K", 256, 210},
};

// The row of a type id read from a file; nullopt for ids this project does
// not handle.
inline std::optional<GgufTypeInfo> FindGgufType(uint32_t id) {
  for (const GgufTypeInfo& info : kGgufTypes) {
    if (static_cast<uint32_t>(info.type) == id) return info;
  }
  return std::nullopt;
}

inline std::optional<GgufTypeInfo> FindGgufTypeByName(absl::string_view name) {
  for (const GgufTypeInfo& info : kGgufTypes) {
    if (name == info.name) return info;
  }
  return std::nullopt;
}

inline const GgufTypeInfo& GgufTypeOf(GgufType type) {
  for (const GgufTypeInfo& info : kGgufTypes) {
    if (info.type == type) return info;
  }
  return kGgufTypes[0];  // unreachable: every enumerator has a row
}

// llama-quantize's preset mixes by name; which tensor gets which type is
// the engine's policy (worker/engine/gguf/gguf_presets.h).
struct GgufPreset {
  const char* name;     // as llama-quantize spells it: "Q4_K_M"
  uint32_t file_type;   // llama_ftype, written as general.file_type
  GgufType base;        // the type of every tensor no rule changes
};

inline constexpr GgufPreset kGgufPresets[] = {
    {"F32", 0, GgufType::kF32},     {"F16", 1, GgufType::kF16},
    {"BF16", 32, GgufType::kBF16},  {"Q8_0", 7, GgufType::kQ8_0},
    {"Q4_0", 2, GgufType::kQ4_0},   {"Q4_1", 3, GgufType::kQ4_1},
    {"Q5_0", 8, GgufType::kQ5_0},   {"Q5_1", 9, GgufType::kQ5_1},
    {"Q2_K", 10, GgufType::kQ2_K},  {"Q3_K_M", 12, GgufType::kQ3_K},
    {"Q4_K_M", 15, GgufType::kQ4_K}, {"Q5_K_M", 17, GgufType::kQ5_K},
    {"Q6_K", 18, GgufType::kQ6_K},
};

// The preset named `name` (case-insensitive); nullopt for others.
inline std::optional<GgufPreset> FindGgufPreset(absl::string_view name) {
  for (const GgufPreset& preset : kGgufPresets) {
    if (absl::EqualsIgnoreCase(name, preset.name)) return preset;
  }
  return std::nullopt;
}

// "F32, F16, ..." for messages.
inline std::string GgufPresetNames() {
  std::string names;
  for (const GgufPreset& preset : kGgufPresets) {
    if (!names.empty()) names += ", ";
    names += preset.name;
  }
  return names;
}

}  // namespace compress
