#!/usr/bin/env bash
# CUDA build check: compile fedfull_ops with its CUDA kernels for sm_80 and sm_90 against the CUDA 13 torch,
# load it and check that every op has a CUDA kernel registered. Nothing runs on a GPU (none is needed).
#
#   bash .ci/cuda_build_check.sh
#
# It uses a virtual environment of its own (FEDFULL_CUDA_VENV, default /tmp/fedfull-cuda-venv, reused when it
# already holds the right torch) and builds a copy of setup.py + csrc/ in a temporary directory, so the
# repository gets no build products.
set -euo pipefail

TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}
VENV=${FEDFULL_CUDA_VENV:-/tmp/fedfull-cuda-venv}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-2}
export FEDFULL_CUDA=1        # build the CUDA kernels although this machine has no GPU
repo=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda_build_check: no nvcc under CUDA_HOME=$CUDA_HOME" >&2
    exit 1
fi

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_CUDA_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
    echo "cuda_build_check: creating $VENV with torch==$TORCH_CUDA_VERSION (CUDA build)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_CUDA_VERSION" setuptools wheel ninja numpy
fi
"$VENV/bin/python" -c "import torch; print('cuda_build_check: torch', torch.__version__, 'CUDA', torch.version.cuda)"

work=$(mktemp -d /tmp/fedfull-cuda-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$repo/setup.py" "$repo/csrc" "$work/"
cd "$work"
"$VENV/bin/python" setup.py -q build_ext --inplace > build.log 2>&1 || { tail -n 60 build.log >&2; exit 1; }
so=$(ls fedfull_ops*.so)
# the fatbinary must hold code for both architectures (cuobjdump: the toolkit's, else the one triton ships)
cuobjdump=$(ls "$CUDA_HOME/bin/cuobjdump" "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -n 1 || true)
for sm in sm_80 sm_90; do
    if [ -n "$cuobjdump" ]; then
        elves=$("$cuobjdump" --list-elf "$so")   # (not piped into grep -q: pipefail would trip on SIGPIPE)
        [[ "$elves" == *"$sm"* ]] || { echo "cuda_build_check: no $sm code in $so" >&2; exit 1; }
    else
        grep -rq "code=$sm" build || { echo "cuda_build_check: $sm was not targeted" >&2; exit 1; }
    fi
done
echo "cuda_build_check: built $so with code for sm_80 and sm_90 in $((SECONDS - start)) s"

# z's bits depend on nvcc fusing no multiply-add: the PTX must have no fma/mad on floats (the correctly
# rounded div.rn / sqrt.rn are single PTX instructions; their SASS expansions are exact by construction)
incs=$("$VENV/bin/python" -c "
import glob, os, sysconfig, torch
from torch.utils.cpp_extension import include_paths
d = include_paths('cuda') + glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', 'cu*', 'include'))
print(' '.join('-I' + p for p in d + [sysconfig.get_paths()['include'], 'csrc']))")
# shellcheck disable=SC2086
"$CUDA_HOME/bin/nvcc" $incs -ptx csrc/fedfull_cuda.cu -o fedfull_cuda.ptx -std=c++20 -O3 --fmad=false \
    -arch=compute_80 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=fedfull_ops
fused=$(grep -cE "(fma|mad)[.a-z]*\.f(16|32|64)" fedfull_cuda.ptx || true)
[ "$fused" = 0 ] || { echo "cuda_build_check: $fused fused multiply-adds in the PTX" >&2; exit 1; }
echo "cuda_build_check: PTX has no fused multiply-add"

"$VENV/bin/python" - <<'EOF'
import torch
import fedfull_ops  # noqa: F401  registers torch.ops.fedfull.*

has = torch._C._dispatch_has_kernel_for_dispatch_key
missing = [f"fedfull::{op} [{key}]" for op in ("perturb_", "apply_seeds_", "perturb_multi_", "apply_seeds_multi_", "noise_fill_",
                                                "perturb_masked_multi_", "apply_seeds_masked_multi_") for key in ("CPU", "CUDA", "Meta")
           if not has(f"fedfull::{op}", key)]
missing += [f"fedfull::noise_masked_fill_ [{key}]" for key in ("CPU", "CUDA") if not has("fedfull::noise_masked_fill_", key)]
assert not missing, f"kernels not registered: {missing}"
# noise is composite (it allocates on the requested device and calls noise_fill_, which dispatches)
assert has("fedfull::noise", "CompositeImplicitAutograd")
# the copy-writing ops: a fused CPU kernel; every other device (CUDA) runs the plain op, then copy_
for op in ("perturb_copy_multi_", "apply_seeds_copy_multi_"):
    assert has(f"fedfull::{op}", "CPU") and has(f"fedfull::{op}", "CompositeExplicitAutograd"), op
print("cuda_build_check: perturb_, apply_seeds_, their _multi_ and _masked_multi_ forms and noise_fill_ have CPU, CUDA "
      "and Meta kernels, noise_masked_fill_ CPU and CUDA; noise is composite; the _copy_multi_ ops have a CPU kernel and "
      "a composite one")
EOF
echo "cuda_build_check: OK in $((SECONDS - start)) s (sm_80, sm_90)"
