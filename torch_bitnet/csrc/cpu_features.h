// Run-time choice of the kernel path. The best path the CPU supports is selected when the
// library loads; set_isa() switches (torch_bitnet.isa exposes it and TORCH_BITNET_ISA).
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace tbn {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vbmi = 3, Amx = 4 };

// Names of the paths this CPU can run, slowest first ("scalar", "avx2", "avx512", "avx512vbmi",
// "amx"; avx512vbmi is avx512 plus the 5-trit and 3-trit weight kernels that need VBMI, amx is
// avx512vbmi with the prefill products on AMX tiles).
std::vector<std::string> supported_isa_names();
std::string current_isa_name();
// Throws c10::ValueError for an unknown name and c10::Error if the CPU lacks the path.
void select_isa(const std::string& name);
// The kernel table of the selected path.
const Kernels& kernels();

}  // namespace tbn
