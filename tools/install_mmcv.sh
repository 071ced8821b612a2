#!/usr/bin/env bash
# Install mmcv 2.1.0 with its compiled ops (what mmdet 3.3.0 and
# mmsegmentation 1.2.2 need) into the active Python environment, built against
# the torch installed there.
#
#   bash tools/install_mmcv.sh [--wheel FILE | --prefer-wheel FILE]
#       [--sha256 HEX] [--cache DIR] [--jobs N] [--cpu | --cuda]
#
# A wheel is taken, in this order, from --wheel (or $DAVIT_EXT_MMCV_WHEEL;
# refused if its hash does not check out), from --prefer-wheel (used only if
# it is the known wheel for this environment, else ignored), from the cache (or $DAVIT_EXT_WHEEL_CACHE, default
# ~/.cache/davit_ext/wheels), or built from mmcv's PyPI source: about 11
# minutes on 2 CPU cores, cached for next time. Every wheel is checked against
# a sha256 before it is installed: one we know (the CPU wheel for torch 2.14.1
# / CPython 3.11 that this script builds), --sha256, or the hash written next
# to a wheel this script built. The source archive is checked against PyPI's
# published sha256. The only change to the source: torch >= 2.5's headers
# need C++20, mmcv 2.1.0 compiles with -std=c++17.
#
# mmcv-lite (the classification default) is replaced: both install the same
# `mmcv` package. To go back: pip uninstall mmcv && pip install mmcv-lite.
set -euo pipefail

MMCV_VERSION=2.1.0
SRC_SHA256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f
# Wheels we built and checked, keyed by what they were built against.
declare -A KNOWN_WHEELS=(
  [cp311-torch2.14.1-cpu]=c2789178a221e9531cb9c61d1ebe0019112c2e12486671f2609e226439759fa5
)

die() { echo "install_mmcv: $*" >&2; exit 1; }
say() { echo "[install_mmcv $(date +%H:%M:%S)] $*"; }

wheel=${DAVIT_EXT_MMCV_WHEEL:-}
prefer=
want_sha=
cache=${DAVIT_EXT_WHEEL_CACHE:-$HOME/.cache/davit_ext/wheels}
jobs=${MAX_JOBS:-$(nproc)}
target=auto
while [ $# -gt 0 ]; do
  case $1 in
    --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
    --prefer-wheel) prefer=${2:?--prefer-wheel needs a file}; shift 2 ;;
    --sha256) want_sha=${2:?--sha256 needs a hex digest}; shift 2 ;;
    --cache) cache=${2:?--cache needs a folder}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    --cpu) target=cpu; shift ;;
    --cuda) target=cuda; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

command -v python >/dev/null || die "no 'python' on PATH: activate the environment that has torch first"
# What the wheel must match: CPython tag, torch version, CUDA or CPU.
read -r pytag torch_version cuda_version has_gpu < <(python - <<'EOF' || true
import sys
try:
    import torch
except ImportError:
    sys.exit(1)
print(f'cp{sys.version_info[0]}{sys.version_info[1]}',
      torch.__version__.split('+')[0], torch.version.cuda or 'none',
      int(torch.cuda.is_available()))
EOF
)
[ -n "${torch_version:-}" ] || die "torch is not importable in $(command -v python): install torch first (mmcv's ops are compiled against it)"
# CUDA ops when asked (--cuda) or when a GPU and nvcc are both here; a
# CUDA build of torch on a machine without a GPU gets CPU ops.
device=cpu
if [ "$target" = cuda ] || { [ "$target" = auto ] && [ "$has_gpu" = 1 ] && command -v nvcc >/dev/null; }; then
  [ "$cuda_version" != none ] || die "--cuda: this torch has no CUDA (torch.version.cuda is None)"
  command -v nvcc >/dev/null || die "--cuda: no nvcc on PATH (install the CUDA toolkit $cuda_version)"
  device=cu${cuda_version//./}
fi
key=$pytag-torch$torch_version-$device
say "environment: $(command -v python) ($pytag), torch $torch_version, target $device"

# Installed means: no mmcv-lite shares the `mmcv` folder (pip installs both
# into it, the last one wins) and the module that imports is this version,
# with its ops.
installed=$(python - <<'EOF' 2>/dev/null || true
from importlib import metadata
try:
    metadata.version('mmcv-lite')
    print('mmcv-lite')
except metadata.PackageNotFoundError:
    import mmcv
    import mmcv.ops  # noqa: F401
    print(metadata.version('mmcv'), mmcv.__version__)
EOF
)
if [ "$installed" = "$MMCV_VERSION $MMCV_VERSION" ]; then
  say "mmcv $MMCV_VERSION with ops is already installed: nothing to do"
  exit 0
fi

sha_of() { python -c "import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],'rb');[h.update(b) for b in iter(lambda:f.read(1<<20),b'')];print(h.hexdigest())" "$1"; }

# The hash a wheel must have: --sha256, else the one we know for this
# environment, else the one recorded when this script built it.
expected_sha_for() {
  if [ -n "$want_sha" ]; then echo "$want_sha"; return; fi
  if [ -f "$1.sha256" ]; then cut -d' ' -f1 "$1.sha256"; return; fi
  echo "${KNOWN_WHEELS[$key]:-}"
}

check_wheel() {
  local file=$1 expect got
  expect=$(expected_sha_for "$file")
  [ -n "$expect" ] || die "no sha256 to check $file against (built for $key?): pass --sha256 HEX, or let this script build the wheel"
  say "checking sha256 of $(basename "$file") ..."
  got=$(sha_of "$file")
  [ "$got" = "$expect" ] || die "sha256 mismatch for $file: expected $expect, got $got; not installing it (delete it to rebuild)"
}

cached=$cache/$key/mmcv-$MMCV_VERSION-$pytag-$pytag-linux_x86_64.whl
if [ -z "$wheel" ] && [ -n "$prefer" ]; then
  if [ ! -f "$prefer" ]; then
    say "no wheel at $prefer: looking further"
  elif [ -z "${KNOWN_WHEELS[$key]:-}" ]; then
    say "$(basename "$prefer") is not a wheel we know for $key: looking further"
  elif [ "$(sha_of "$prefer")" != "${KNOWN_WHEELS[$key]}" ]; then
    say "$prefer does not have the sha256 of the wheel we know for $key: looking further"
  else
    say "using $prefer (sha256 checked: the known wheel for $key)"
    wheel=$prefer
  fi
elif [ -n "$wheel" ]; then
  [ -f "$wheel" ] || die "--wheel $wheel: no such file"
  check_wheel "$wheel"
fi
if [ -z "$wheel" ] && [ -f "$cached" ]; then
  say "using the cached wheel $cached"
  wheel=$cached
  check_wheel "$wheel"
elif [ -z "$wheel" ]; then
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  say "stage 1/4: build tools (ninja, wheel; setuptools with pkg_resources, which mmcv's setup.py imports)"
  python -m pip install -q ninja wheel "setuptools>=77.0.3,<81"
  say "stage 2/4: downloading the mmcv $MMCV_VERSION source archive"
  python -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    "mmcv==$MMCV_VERSION" -d "$build" >/dev/null
  archive=$build/mmcv-$MMCV_VERSION.tar.gz
  got=$(sha_of "$archive")
  [ "$got" = "$SRC_SHA256" ] || die "sha256 mismatch for mmcv-$MMCV_VERSION.tar.gz: expected $SRC_SHA256 (PyPI), got $got"
  tar -xzf "$archive" -C "$build"
  src=$build/mmcv-$MMCV_VERSION
  # torch >= 2.5's headers refuse anything older than C++20.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  grep -q -- '-std=c++20' "$src/setup.py" || die "could not switch $src/setup.py to C++20 (source layout changed?)"
  force_cuda=0
  [ "$device" != cpu ] && force_cuda=1
  say "stage 3/4: compiling mmcv's ops for $device with $jobs jobs: about $(( 22 / jobs + 1 )) minutes on this many CPU cores (77 objects)"
  start=$(date +%s)
  (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=$force_cuda MAX_JOBS=$jobs \
     python -m pip wheel -q --no-deps --no-build-isolation . -w "$build/dist") \
    > "$build/build.log" 2>&1 || { tail -40 "$build/build.log" >&2; die "the build failed (last lines above)"; }
  say "compiled in $(( $(date +%s) - start )) s"
  built=$(ls "$build"/dist/mmcv-*.whl)
  mkdir -p "$(dirname "$cached")"
  cp "$built" "$cached.part" && mv "$cached.part" "$cached"
  echo "$(sha_of "$cached")  $(basename "$cached")" > "$cached.sha256"
  say "cached $cached (sha256 $(cut -d' ' -f1 "$cached.sha256"))"
  wheel=$cached
fi

say "stage 4/4: installing $(basename "$wheel") (replaces mmcv-lite if present)"
python -m pip uninstall -q -y mmcv-lite mmcv >/dev/null 2>&1 || true
python -m pip install -q "$wheel"
python -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION', mmcv.__version__; print('mmcv', mmcv.__version__, 'with ops')" \
  || die "mmcv installed but 'import mmcv.ops' fails (was the wheel built for torch $torch_version?)"
say "done: mmcv $MMCV_VERSION with ops. mmdet/mmseg: pip install -e '.[det,seg]'"
