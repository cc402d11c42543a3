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
# torchaudio for the torchaudio model family's tests (optional; empty: skip it)
TORCHAUDIO_SPEC=${SQ_TORCHAUDIO_SPEC-torchaudio==2.11.0}

# Workaround: torchaudio 2.11.0, its last release, is published as a CUDA build whose compiled
# extension (torchaudio/lib/*.so) needs a CUDA torch 2.11 and does not load beside the CPU torch
# used here. Its models and pipelines are pure Python, and torchaudio imports without its
# extension when the library files are absent (torchaudio/_extension/utils.py:_load_lib), so we
# install it without dependencies (it would pull in another torch) and delete the libraries that
# fail to load. Only its compiled operators need them (forced alignment, RNN-T loss, the CUDA CTC
# decoder; lfilter falls back to Python): nothing here uses those. Remove when a torchaudio
# release imports with the torch in TORCH_SPEC (then install it as an ordinary dependency), or
# when the torchaudio family is dropped.
# Never fails the set-up: a warning; `./sq.sh test` then fails those tests saying why (they skip
# only where SQ_TORCHAUDIO_SPEC= is set empty, or under a bare pytest). Runs once per venv
# (stamp $VENV/.sq-torchaudio, holding the spec); delete the stamp to retry.
setup_torchaudio() {
  local stamp="$VENV/.sq-torchaudio" py="$VENV/bin/python"
  [ -n "$TORCHAUDIO_SPEC" ] || return 0
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$TORCHAUDIO_SPEC" ] && [ "$stamp" -nt "$VENV/.sq-installed" ]; then
    return 0
  fi
  if ! "$py" -c "import torchaudio" 2>/dev/null; then
    echo "sq.sh: installing $TORCHAUDIO_SPEC (--no-deps, Python parts only) into $VENV" >&2
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "$TORCHAUDIO_SPEC"; then
      echo "sq.sh: warning: cannot install $TORCHAUDIO_SPEC; the torchaudio tests will fail" \
           "(delete $stamp to retry)" >&2
      echo "$TORCHAUDIO_SPEC" > "$stamp"
      return 0
    fi
    if ! "$py" -c "import torchaudio" 2>/dev/null; then
      # every compiled library inside the package (torchaudio/lib/: _torchaudio, libtorchaudio,
      # torchaudio_prefixctc); each links libtorch_cuda/libc10_cuda of torch 2.11
      local pkg
      pkg=$("$py" -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('torchaudio').origin))")
      find "$pkg" -name '*.so' -type f -print -delete | sed 's/^/sq.sh: removed /' >&2
    fi
  fi
  if ! "$py" -c "import torchaudio.models" 2>/dev/null; then
    echo "sq.sh: warning: torchaudio does not import; the torchaudio tests will fail" \
         "(delete $stamp to retry)" >&2
  fi
  echo "$TORCHAUDIO_SPEC" > "$stamp"
}

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
  setup_torchaudio
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec "$VENV/bin/stablequant" quantize --model demo --out runs/demo --overwrite "$@" ;;
  test)
    setup
    # the torchaudio family's tests fail instead of skipping when its set-up was asked for
    [ -n "$TORCHAUDIO_SPEC" ] && export SQ_EXPECT_TORCHAUDIO=1
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./sq.sh demo|test [extra args]" >&2; exit 2 ;;
esac
