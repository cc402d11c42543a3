#!/usr/bin/env bash
# The two quick-start commands on a fresh machine: `./sq.sh demo` and `./sq.sh test`.
# Sets up ./.venv once (CPU build of torch first, so pip never resolves the multi-GB CUDA wheel),
# then runs the StableQuant demo or the test suite. Extra arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SQ_VENV:-.venv}
TORCH_SPEC=${SQ_TORCH_SPEC:-torch==2.13.0}
# Extra pip arguments for the torch install, e.g. where pip would otherwise find a CUDA build:
#   SQ_TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" ./sq.sh test
read -r -a TORCH_PIP_ARGS <<< "${SQ_TORCH_PIP_ARGS:-}"

setup() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.sq-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
      echo "sq.sh: installing $TORCH_SPEC (CPU build) into $VENV" >&2
      "$VENV/bin/pip" install -q --disable-pip-version-check ${TORCH_PIP_ARGS[@]+"${TORCH_PIP_ARGS[@]}"} "$TORCH_SPEC"
    fi
    echo "sq.sh: installing sq-plugin and its dependencies into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec "$VENV/bin/stablequant" quantize --model demo --out runs/demo --overwrite "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./sq.sh demo|test [extra args]" >&2; exit 2 ;;
esac
