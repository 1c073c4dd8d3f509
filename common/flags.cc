#include "common/flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace compress {

void FlagSet::Add(std::string name, std::string* value, std::string help) {
  flags_.push_back({std::move(name), value, std::move(help)});
}
void FlagSet::Add(std::string name, int* value, std::string help) {
  flags_.push_back({std::move(name), value, std::move(help)});
}
void FlagSet::Add(std::string name, bool* value, std::string help) {
  flags_.push_back({std::move(name), value, std::move(help)});
}
void FlagSet::Add(std::string name, std::vector<std::string>* values, std::string help) {
  flags_.push_back({std::move(name), values, std::move(help)});
}

const FlagSet::Flag* FlagSet::Find(const std::string& name) const {
  for (const Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

absl::Status FlagSet::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return absl::FailedPreconditionError(Usage());
    if (arg.rfind("--", 0) != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* flag = Find(name);
    if (flag == nullptr && name.rfind("no-", 0) == 0) {
      const Flag* negated = Find(name.substr(3));
      if (negated != nullptr && std::holds_alternative<bool*>(negated->target)) {
        *std::get<bool*>(negated->target) = false;
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, "\n", Usage()));
    }
    if (std::holds_alternative<bool*>(flag->target)) {
      bool b = true;
      if (has_value && !absl::SimpleAtob(value, &b)) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, ": not a boolean: ", value));
      }
      *std::get<bool*>(flag->target) = b;
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      value = argv[++i];
    }
    if (auto* s = std::get_if<std::string*>(&flag->target)) {
      **s = value;
    } else if (auto* n = std::get_if<int*>(&flag->target)) {
      if (!absl::SimpleAtoi(value, *n)) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, ": not an integer: ", value));
      }
    } else if (auto* v = std::get_if<std::vector<std::string>*>(&flag->target)) {
      (*v)->push_back(value);
    }
  }
  return absl::OkStatus();
}

std::string FlagSet::Usage() const {
  std::string out = absl::StrCat("usage: ", program_, " [flags]\n");
  for (const Flag& f : flags_) {
    std::string shown;
    if (auto* s = std::get_if<std::string*>(&f.target)) shown = **s;
    if (auto* n = std::get_if<int*>(&f.target)) shown = std::to_string(**n);
    if (auto* b = std::get_if<bool*>(&f.target)) shown = **b ? "true" : "false";
    absl::StrAppend(&out, "  --", f.name, "  ", f.help);
    if (!shown.empty()) absl::StrAppend(&out, " (default: ", shown, ")");
    out += "\n";
  }
  return out;
}

}  // namespace compress
