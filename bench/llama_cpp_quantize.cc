// llama.cpp's quantizer (llama-quantize's library call), loaded at run time
// from the libllama.so named by $LIBLLAMA, so that gguf_vs_llama_cpp.sh
// measures it beside the project's export in the same run. Prints the
// seconds llama_model_quantize took.
//
//   LIBLLAMA=/path/libllama.so llama_cpp_quantize IN.gguf OUT.gguf FTYPE THREADS
//
// FTYPE is llama.cpp's enum llama_ftype (Q4_K_M = 15). Only the two leading
// fields of llama_model_quantize_params are set (nthread, ftype), on the
// library's own defaults; the struct is received into a buffer larger than
// any version of it (returned through a hidden pointer either way).
#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

struct QuantizeParams {
  unsigned char bytes[1024];
};

using DefaultsFn = QuantizeParams (*)();
using QuantizeFn = uint32_t (*)(const char*, const char*, const QuantizeParams*);
using InitFn = void (*)();

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 || getenv("LIBLLAMA") == nullptr) {
    fprintf(stderr, "usage: LIBLLAMA=libllama.so llama_cpp_quantize IN OUT FTYPE THREADS\n");
    return 2;
  }
  void* library = dlopen(getenv("LIBLLAMA"), RTLD_NOW | RTLD_GLOBAL);
  if (library == nullptr) {
    fprintf(stderr, "llama_cpp_quantize: %s\n", dlerror());
    return 2;
  }
  auto defaults =
      reinterpret_cast<DefaultsFn>(dlsym(library, "llama_model_quantize_default_params"));
  auto quantize = reinterpret_cast<QuantizeFn>(dlsym(library, "llama_model_quantize"));
  auto backend_init = reinterpret_cast<InitFn>(dlsym(library, "llama_backend_init"));
  if (defaults == nullptr || quantize == nullptr) {
    fprintf(stderr, "llama_cpp_quantize: %s has no llama_model_quantize\n", getenv("LIBLLAMA"));
    return 2;
  }
  if (backend_init != nullptr) backend_init();
  QuantizeParams params = defaults();
  const int32_t threads = atoi(argv[4]);
  const int32_t ftype = atoi(argv[3]);
  memcpy(params.bytes, &threads, sizeof threads);
  memcpy(params.bytes + 4, &ftype, sizeof ftype);
  const auto start = std::chrono::steady_clock::now();
  const uint32_t failed = quantize(argv[1], argv[2], &params);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failed) {
    fprintf(stderr, "llama_cpp_quantize: llama_model_quantize returned %u\n", failed);
    return 1;
  }
  printf("%.3f\n", seconds);
  return 0;
}
