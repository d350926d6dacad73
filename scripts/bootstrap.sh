#!/usr/bin/env bash
# Install everything adntn-deploy needs on a fresh Debian machine (run as root), then run the main job
# ("demo", the default) or the test suite ("test"). Extra arguments go to the demo or to pytest.
#
#   bash scripts/bootstrap.sh demo            # install, then: adntn-deploy demo
#   bash scripts/bootstrap.sh test            # install, then: python -m pytest -m "slow or not slow" (every test)
#   bash scripts/bootstrap.sh test -m slow    # the slow end-to-end tests
#
# Uses the python3 on PATH when it is >= 3.10 and pip may install into it; otherwise (Debian's own
# "externally managed" Python, or ADNTN_VENV=1) it creates .venv/ in the repository and uses that.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
[ $# -gt 0 ] && shift

apt_install() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        echo "bootstrap: please install the Debian packages: ${missing[*]} (needs root and apt-get)" >&2
        exit 1
    fi
    echo "bootstrap: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

if ! python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 10)' >/dev/null 2>&1; then
    apt_install python3 python3-venv python3-pip
fi
# Cross toolchains and qemu: compile for ARM / RISC-V boards and check the aarch64 artifacts here.
apt_install g++ g++-aarch64-linux-gnu g++-arm-linux-gnueabihf g++-riscv64-linux-gnu qemu-user curl
# Fashion-MNIST (gzip IDX files in /usr/share/datasets/fashion-mnist): train, compress, the accuracy benchmark
apt_install dataset-fashion-mnist

PY=python3
managed=$(python3 -c 'import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
if [ "${ADNTN_VENV:-0}" = 1 ] || [ "$managed" = 1 ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PY=.venv/bin/python
fi

extras="all"
echo "bootstrap: pip install -e .[$extras] (torch is pinned to 2.13.0, CPU build where one is available)" >&2
"$PY" -m pip install -q -e ".[$extras]"
# TVM runtime libraries for aarch64 boards (from the official PyPI wheels; fetched once, at install time)
PYTHON="$PY" bash scripts/fetch_edge_runtime.sh aarch64 >&2

case "$mode" in
    demo) exec "$PY" -m adntn_deploy.cli.main demo "$@" ;;
    # every test, the slow end-to-end ones included (a plain `python -m pytest` skips those); a later -m wins
    test) exec "$PY" -m pytest -m "slow or not slow" --durations=15 "$@" ;;
    install) echo "bootstrap: installed; run $PY -m adntn_deploy.cli.main --help" >&2 ;;
    *) echo "bootstrap: unknown mode '$mode': use demo, test or install" >&2; exit 2 ;;
esac
