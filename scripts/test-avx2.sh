#!/usr/bin/env bash
# Run the numeric tests on a CPU without AVX-512, on any x86-64 machine: the Python interpreter runs under
# qemu-x86_64 -cpu Haswell (AVX2 + FMA, no AVX-512), so ONNX Runtime's MLAS, torch and numpy pick their
# AVX2 kernels from CPUID, as on an AVX2-only machine. Slow (TCG emulation: one torch-vs-ORT test takes
# about 2.5 minutes), so the default selection is the table's conv/aTTN case (which failed on an AVX2 EPYC
# against a CPU-tuned tolerance) and one linear case, plus the tolerance tests: about 5 minutes.
#
#   bash scripts/test-avx2.sh                      # the default selection below
#   bash scripts/test-avx2.sh tests/test_split.py  # any pytest arguments instead
#
# Needs qemu-user (apt-get install qemu-user; scripts/bootstrap.sh installs it). TVM artifacts compiled
# here for --target host would use this machine's AVX-512: the AVX2 path of TVM is the x86-64-avx2 profile,
# whose records and kernels tests/test_records.py compiles and runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
command -v qemu-x86_64 >/dev/null || { echo "test-avx2: qemu-x86_64 not found: apt-get install qemu-user" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || { echo "test-avx2: this check is for x86-64 machines" >&2; exit 1; }
PY="$(command -v "$PY")"
PY="$("$PY" -c 'import sys; print(sys.executable)')"
qemu() { qemu-x86_64 -cpu Haswell "$PY" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
# prove the emulated CPU has AVX2 and no AVX-512 before trusting the result
qemu - <<'PY'
flags = set()
import numpy._core._multiarray_umath as m
found = set(m.__cpu_features__[k] and k for k in m.__cpu_features__) - {False}
assert "AVX2" in found and "AVX512F" not in found, f"emulated CPU features: {sorted(found)}"
print("test-avx2: emulated CPU has AVX2 + FMA3, no AVX-512", flush=True)
PY
if [ $# -eq 0 ]; then
    set -- tests/test_tolerance.py "tests/test_onnx_export.py::test_torch_equals_onnxruntime[conv-attn-split]" \
        "tests/test_onnx_export.py::test_torch_equals_onnxruntime[linear-ttn-operator]" -q -p no:cacheprovider
fi
exec qemu-x86_64 -cpu Haswell "$PY" -m pytest "$@"
