#!/usr/bin/env bash
# Installs what pallas_kernels/ptxas_report.py needs to compile Mosaic GPU kernels for a Hopper
# GPU on a machine without one, into a directory of its own (kept off sys.path, so that JAX
# does not load it as a GPU backend):
#
#   bash scripts/get_sm90_toolchain.sh DIR      # about 240 MB from PyPI, 1 minute
#   python -m pallas_kernels.ptxas_report --toolchain DIR
#
#   - jax-cuda12-pjrt and jax-cuda12-plugin at this interpreter's jaxlib version: Mosaic GPU's
#     compiler (MosaicGpuCompile) and its runtime library;
#   - nvidia-cuda-nvcc-cu12: ptxas;
#   - DIR/fake_driver/libcuda.so.1, built from scripts/fake_libcuda.c with cc: it tells the
#     compiler it runs on a compute capability 9.0 device and refuses to load the result.
#
# PYTHON picks the interpreter (python); its jaxlib fixes the plugin's version.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: bash scripts/get_sm90_toolchain.sh DIR}")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
JAXLIB=$("$PYTHON" -c "import jaxlib; print(jaxlib.__version__)")
mkdir -p "$DIR/fake_driver"
"$PYTHON" -m pip install -q --no-deps --target "$DIR" \
    "jax-cuda12-pjrt==$JAXLIB" "jax-cuda12-plugin==$JAXLIB" "nvidia-cuda-nvcc-cu12>=12.8,<13"
${CC:-cc} -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$DIR/fake_driver/libcuda.so.1" \
    scripts/fake_libcuda.c
echo "sm_90 toolchain for jaxlib $JAXLIB in $DIR"
