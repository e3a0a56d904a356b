#!/usr/bin/env bash
# The GPU suite in one command, for a CUDA machine without network access.
#
#   bash benchmarks/gpu_suite.sh WHEEL_DIR OUT_DIR [gpu_suite.py options, e.g. --steps 20 or --dry-run]
#   bash benchmarks/gpu_suite.sh --join-only WHEEL_DIR DEST_DIR      (only join split wheels)
#
# WHEEL_DIR holds the wheels the machine lacks (diffusers for export and the torch baseline,
# onnxruntime-gpu for the ort backend, tensorrt and polygraphy for trt; pytest, pluggy and iniconfig
# for the GPU tests; setuptools where it is missing), whole or
# split into pieces named NAME.whl.part-aa, NAME.whl.part-ab, ... (`split -b 60M NAME.whl NAME.whl.part-`).
# Pieces are joined in suffix order, every wheel is installed with
# `pip install --no-index --no-deps --target $SITE_DIR` (default /tmp/site), which goes first on
# PYTHONPATH (so onnxruntime-gpu there shadows a CPU onnxruntime). Unless this repository is the
# installed kandinsky-trt, it is installed there too (its entry points register the torch backend).
# Then `python -m kandinsky_trt.benchmarks.gpu_suite --out OUT_DIR --repo REPO ...` runs.
# Environment: PYTHON (default python3), SITE_DIR. Exit status: the suite's (2: no CUDA device).
set -euo pipefail
export LC_ALL=C  # glob order = byte order: part-aa, part-ab, ...

say() { echo "gpu_suite.sh: $*" >&2; }

suffix() {  # the N-th suffix of `split`: 0 -> aa, 1 -> ab, 26 -> ba
  local letters=(a b c d e f g h i j k l m n o p q r s t u v w x y z)
  echo "${letters[$(($1 / 26))]}${letters[$(($1 % 26))]}"
}

join_wheels() {  # join_wheels SRC DEST: whole wheels copied, split ones concatenated in order
  local src=$1 dest=$2 part name index expected
  mkdir -p "$dest"
  shopt -s nullglob
  for whl in "$src"/*.whl; do cp "$whl" "$dest/"; done
  declare -A done_names=()
  for part in "$src"/*.whl.part-*; do
    name=$(basename "${part%.part-*}")
    [[ -n ${done_names[$name]:-} ]] && continue
    done_names[$name]=1
    local pieces=("$src/$name".part-*)
    for index in "${!pieces[@]}"; do
      expected="$src/$name.part-$(suffix "$index")"
      if [[ ${pieces[$index]} != "$expected" ]]; then
        say "wheel $name: expected piece $(basename "$expected"), found $(basename "${pieces[$index]}") (a piece is missing)"
        return 3
      fi
    done
    cat "${pieces[@]}" > "$dest/$name.partial"
    mv "$dest/$name.partial" "$dest/$name"
    say "joined $name from ${#pieces[@]} pieces ($(wc -c < "$dest/$name") bytes)"
  done
}

if [[ ${1:-} == "--join-only" ]]; then
  [[ $# -eq 3 ]] || { say "usage: $0 --join-only WHEEL_DIR DEST_DIR"; exit 64; }
  join_wheels "$2" "$3"
  exit 0
fi
[[ $# -ge 2 ]] || { say "usage: $0 WHEEL_DIR OUT_DIR [gpu_suite.py options]"; exit 64; }

WHEELS=$1 OUT=$2
shift 2
PYTHON=${PYTHON:-python3}
SITE=${SITE_DIR:-/tmp/site}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -d $WHEELS ]] || { say "WHEEL_DIR: expected a folder of wheels, found no folder $WHEELS"; exit 64; }
mkdir -p "$OUT" "$SITE"

JOINED=$(mktemp -d)
trap 'rm -rf "$JOINED"' EXIT
join_wheels "$WHEELS" "$JOINED"
shopt -s nullglob
wheels=("$JOINED"/*.whl)
if ((${#wheels[@]})); then
  say "installing ${#wheels[@]} wheel(s) into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

installed=$("$PYTHON" -c "import importlib.metadata as m, os, kandinsky_trt.benchmarks as b
m.version('kandinsky-trt'); print(os.path.realpath(b.__file__))" 2>/dev/null || true)
if [[ $installed != "$(cd "$REPO" && pwd -P)/benchmarks/__init__.py" ]]; then
  say "installing $REPO into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$REPO"
fi

"$PYTHON" -m kandinsky_trt.benchmarks.gpu_suite --out "$OUT" --repo "$REPO" "$@"
