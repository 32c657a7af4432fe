"""Build the fedfull extension: the seed-based perturbation ops of csrc/ as `fedfull_ops`.

CPU kernels are always built. CUDA kernels are built too when nvcc is found and torch is a CUDA build
(or FEDFULL_CUDA=1 forces it, e.g. to compile-check on a machine without a GPU).
Install without build isolation so the torch already installed is the one built against:
    pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
except ImportError:  # an isolated build (pip without --no-build-isolation) cannot see the installed torch
    sys.exit("fedfull: torch is not importable in this build environment. Install torch first, then build "
             "against it without isolation: pip install --no-build-isolation -e .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
want_cuda = os.environ.get("FEDFULL_CUDA", "auto")
with_cuda = bool(cuda_sources) and (
    want_cuda == "1" or (want_cuda == "auto" and CUDA_HOME is not None and torch.version.cuda is not None)
)

# Bit-identical z needs IEEE arithmetic with no fused multiply-add anywhere: -ffp-contract=off for C++ (the
# SIMD paths are chosen at run time with __builtin_cpu_supports, so no -march flag: one build stays portable)
# and --fmad=false for nvcc (its default would fuse). Never add -ffast-math / --use_fast_math.
# (-fno-math-errno changes no result: it only lets sqrtf be inlined and vectorized.)
ext_modules = []
if cpp_sources:
    extra = {"cxx": ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]}
    Extension = CppExtension
    sources = cpp_sources
    include_dirs = [os.path.join(here, "csrc")]
    if with_cuda:
        Extension = CUDAExtension
        sources = cpp_sources + cuda_sources
        extra["nvcc"] = ["-O3", "--fmad=false", "-Xcompiler", "-ffp-contract=off"]
        # pip's CUDA torch ships the CUDA headers it was built with (e.g. site-packages/nvidia/cu13/include)
        include_dirs += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")))
        # target GPUs: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), else the GPUs present
    ext_modules.append(
        Extension("fedfull_ops", sources, include_dirs=include_dirs, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"])
    )

setup(
    name="fedfull",
    version="0.1.0",
    description="Federated full-parameter tuning of LLMs: FedKSeed and FedCyBGD, with fused seed-based kernels",
    py_modules=["fedkseed", "fedcybgd", "fedavg"],
    packages=["tasks", "seedops", "fedfull_flower"],
    package_dir={"fedfull_flower": "flower/fedfull_flower"},  # the Flower App's code, importable where fedfull is
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
