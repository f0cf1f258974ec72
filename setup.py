"""Build of torch_bitnet's C++ extension (torch_bitnet._C).

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the
torch already installed (an isolated build would download another torch).

No -march flags: each SIMD path carries its own per-function target attributes and is
chosen at run time, so one build runs on any x86-64 (and builds on ARM, scalar only).
-ffp-contract=off keeps the float epilogue free of fused multiply-adds, so every path
rounds exactly like the plain-PyTorch reference.

-fopenmp: at::parallel_for is inlined from ATen's headers and only uses torch's OpenMP
thread pool when the extension itself is compiled with OpenMP (without it every op runs on
one thread). The link resolves to the libgomp.so.1 torch has already loaded.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("torch_bitnet", "csrc", "*.cpp")))

setup(
    ext_modules=[
        CppExtension(
            name="torch_bitnet._C",
            sources=sources,
            extra_compile_args={"cxx": ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
