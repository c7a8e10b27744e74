#!/usr/bin/env bash
# The demo: install, convert the shipped demo model for 2 ranks, and hold a scripted conversation with it on CPU
# under torchrun. The model answers questions from what was said turns earlier: with a wrong cache between turns,
# its answers would be wrong. Each reply is followed by the reuse line (tokens from the cache / computed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
ckpt=out/demo-mp2
if [ ! -f "$ckpt/model1-mp2.safetensors" ]; then
	.venv/bin/tp-infer-convert --hf-ckpt-path demo/model --save-path "$ckpt" --model-parallel 2
fi
conversation=(
	"My name is Alice."
	"I live in Lisbon."
	"The code for door is 4821."
	"How are you?"
	"What is my name?"
	"Where do I live?"
	"What is the code for door?"
	"/stats"
)
printf '%s\n' "${conversation[@]}" |
	OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
		-m tp_infer.generate --ckpt-path "$ckpt" --interactive --device cpu --dtype fp32 --max-new-tokens 32 \
		--system "You are a helpful assistant."
echo
echo "Chat with it yourself (Ctrl-C stops a reply, /help lists the commands):"
echo "    PYTHON=.venv/bin/python launch/run_local.sh $ckpt --interactive --device cpu"
