#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <atomic>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tbn {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512vbmi", "amx"};
constexpr int kNumIsas = 5;

#if defined(__x86_64__) || defined(_M_X64)
// AMX-TILE and AMX-INT8 (CPUID.(EAX=7, ECX=0):EDX bits 24 and 25), the OS keeping the tile state
// (XCR0 bits 17 and 18), and Linux's per-process permission to use it: without
// arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) the first tile instruction raises SIGILL. Asked for
// once; the permission covers every thread of the process.
bool amx_usable() {
  static const bool usable = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: XGETBV works
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}
#endif

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
    case Isa::Amx:
      return cpu_has(Isa::Avx512Vbmi) && amx_usable();
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::Amx, Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2})
    if (cpu_has(isa)) return isa;
  return Isa::Scalar;
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};

}  // namespace

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vbmi, Isa::Amx})
    if (cpu_has(isa)) out.emplace_back(kNames[static_cast<int>(isa)]);
  return out;
}

std::string current_isa_name() { return kNames[g_isa.load()]; }

void select_isa(const std::string& name) {
  int found = -1;
  for (int i = 0; i < kNumIsas; ++i)
    if (name == kNames[i]) found = i;
  TORCH_CHECK_VALUE(found >= 0, "torch_bitnet: unknown ISA '", name, "'; choose scalar, avx2, avx512, avx512vbmi or amx");
  TORCH_CHECK(cpu_has(static_cast<Isa>(found)), "this CPU cannot run the ", name,
              " path (avx2 needs AVX2 and FMA; avx512 needs AVX-512 F, BW, VL and VNNI; avx512vbmi needs those and VBMI; "
              "amx needs those, AMX-TILE, AMX-INT8 and the OS's permission to use the tiles)");
  g_isa.store(found);
}

const Kernels& kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  switch (static_cast<Isa>(g_isa.load(std::memory_order_relaxed))) {
    case Isa::Amx:
      return kAmxKernels;
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
