#!/usr/bin/env bash
# Fetch the TVM runtime libraries (libtvm_runtime.so, libtvm_ffi.so) for an edge board from the official
# PyPI wheels and put them in .cache/edge-runtime/<arch>/ (or $ADNTN_EDGE_RUNTIME_DIR if set).
# Usage: scripts/fetch_edge_runtime.sh aarch64
# Only aarch64 has official wheels; for armv7 / riscv64 see adntn_deploy/compiler/runner/README.md.
set -euo pipefail

ARCH="${1:-aarch64}"
TVM_VERSION="0.27.0.post1"
FFI_VERSION="0.1.14.post1"
PYTHON="${PYTHON:-python3}"

case "$ARCH" in
  aarch64) PLATFORM="manylinux_2_28_aarch64" ;;
  *)
    echo "error: no official TVM wheels for '$ARCH'; build the runtime with CMake, see adntn_deploy/compiler/runner/README.md" >&2
    exit 1 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${ADNTN_EDGE_RUNTIME_DIR:-$REPO/.cache/edge-runtime/$ARCH}"

if [[ -f "$DEST/libtvm_runtime.so" && -f "$DEST/libtvm_ffi.so" ]]; then
  echo "edge runtime for $ARCH already present in $DEST"
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --platform "$PLATFORM" --python-version 3.11 --implementation cp \
  "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" -d "$TMP"

mkdir -p "$DEST"
# Extract the two shared libraries (their path inside the wheels: tvm/lib/... and tvm_ffi/lib/...).
"$PYTHON" - "$TMP" "$DEST" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted = {"libtvm_runtime.so": None, "libtvm_ffi.so": None}
for whl in sorted(tmp.glob("*.whl")):
    with zipfile.ZipFile(whl) as zf:
        for name in zf.namelist():
            base = name.rsplit("/", 1)[-1]
            if base in wanted and wanted[base] is None:
                with zf.open(name) as src, open(dest / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                wanted[base] = f"{whl.name}:{name}"
missing = [k for k, v in wanted.items() if v is None]
if missing:
    sys.exit(f"error: {', '.join(missing)} not found in the downloaded wheels ({[w.name for w in tmp.glob('*.whl')]})")
for k, v in wanted.items():
    print(f"  {k} <- {v}")
PY
echo "edge runtime for $ARCH installed in $DEST"
