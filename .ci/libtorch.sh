#!/usr/bin/env bash
# Assembles a CPU-only libtorch 2.9.0 (what burn-tch 0.21 / torch-sys 0.22 link against) in DIR
# from PyPI wheels, without the multi-GB CUDA dependencies: the torch wheel's headers and CPU
# libraries, plus the two small CUDA runtime libraries libtorch_cpu.so names as NEEDED, and an
# empty libtorch.so for torch-sys's `-ltorch`. Does nothing if DIR is already complete.
#
#   .ci/libtorch.sh DIR      then build with LIBTORCH=DIR, run with LD_LIBRARY_PATH=DIR/lib
set -euo pipefail
dir=${1:?usage: libtorch.sh DIR}
if [ "$(cat "$dir/build-version" 2>/dev/null)" = "2.9.0" ]; then
    exit 0
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheels" \
    torch==2.9.0 nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cupti-cu12==12.8.90
rm -rf "$dir"
mkdir -p "$dir/lib" "$dir/include"
unpack=$(mktemp -d -p "$wheels")
python3 - "$wheels" "$unpack" <<'PY'
import sys, zipfile, glob, os
wheels, out = sys.argv[1], sys.argv[2]
keep_torch = ("torch/include/", "torch/lib/libtorch_cpu.so", "torch/lib/libc10.so",
              "torch/lib/libgomp.so.1", "torch/lib/libshm.so")
for wheel in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith(keep_torch) or base in ("libcudart.so.12", "libcupti.so.12"):
                z.extract(name, out)
PY
cp -r "$unpack/torch/include/." "$dir/include/"
cp "$unpack"/torch/lib/* "$dir/lib/"
find "$unpack" -name 'libcudart.so.12' -o -name 'libcupti.so.12' | xargs -I{} cp {} "$dir/lib/"
gcc -shared -o "$dir/lib/libtorch.so" -x c /dev/null
echo 2.9.0 >"$dir/build-version"
echo "libtorch 2.9.0 (CPU) assembled in $dir"
