#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace tbn {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512vbmi"};
constexpr int kNumIsas = 4;

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  // __builtin_cpu_supports also checks that the OS saves the wider register state.
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::Avx512Vbmi:
      return cpu_has(Isa::Avx512) && __builtin_cpu_supports("avx512vbmi");
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2})
    if (cpu_has(isa)) return isa;
  return Isa::Scalar;
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};

}  // namespace

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vbmi})
    if (cpu_has(isa)) out.emplace_back(kNames[static_cast<int>(isa)]);
  return out;
}

std::string current_isa_name() { return kNames[g_isa.load()]; }

void select_isa(const std::string& name) {
  int found = -1;
  for (int i = 0; i < kNumIsas; ++i)
    if (name == kNames[i]) found = i;
  TORCH_CHECK_VALUE(found >= 0, "torch_bitnet: unknown ISA '", name, "'; choose scalar, avx2, avx512 or avx512vbmi");
  TORCH_CHECK(cpu_has(static_cast<Isa>(found)), "this CPU cannot run the ", name,
              " path (avx2 needs AVX2 and FMA; avx512 needs AVX-512 F, BW, VL and VNNI; avx512vbmi needs those and VBMI)");
  g_isa.store(found);
}

const Kernels& kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  switch (static_cast<Isa>(g_isa.load(std::memory_order_relaxed))) {
    case Isa::Avx512Vbmi:
      return kAvx512VbmiKernels;
    case Isa::Avx512:
      return kAvx512Kernels;
    case Isa::Avx2:
      return kAvx2Kernels;
    case Isa::Scalar:
      break;
  }
#endif
  return kScalarKernels;
}

}  // namespace tbn
