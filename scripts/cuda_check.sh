#!/usr/bin/env bash
# The CUDA check at world size 1, for a machine with a GPU: the demo conversation on the GPU (fp32 and bf16), the
# suite with its world-size-1 work on the GPU (TP_INFER_TEST_DEVICE=cuda; larger worlds stay on gloo and the CPU),
# then the benchmarks with --device cuda. Every step gets a deadline inside TOTAL seconds; one that fails or runs out
# of time does not stop the next. Logs, JSON and plots go to OUT_DIR; stdout gets one line per step, each step's
# closing lines and the suite's summary.
# Usage: bash scripts/cuda_check.sh [--dry-run] OUT_DIR [TOTAL seconds, default 540] [pytest workers, default 12]
# ONLY="suite bench_serving" runs only the steps named (compile triton bench_decode bench_cuda_step demo-fp32 demo-bf16
# demo-bf16-cuda-graphs demo-bf16-graphs suite profile_step bench_vs_vllm bench_multiturn bench_serving bench_pool
# bench_tiers bench_kv_cache).
# --dry-run, for a machine without a GPU: checks the script's own plumbing (steps, deadlines, logs) in about a
# minute: the cuda backend's kernels are compiled for sm90 (no GPU needed) and their tests run under Triton's
# interpreter, bench_decode.py and bench_cuda_step.py on tiny shapes on the CPU; every other step logs the command it
# would run.
# Runs $PYTHON (default python3) with this checkout importable; it needs the test and bench extras' packages.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ ${1:-} == --dry-run ]]; then
	dry=1
	shift
fi
out=$(realpath -m "${1:?usage: bash scripts/cuda_check.sh [--dry-run] OUT_DIR [TOTAL] [WORKERS]}")
total=${2:-540}
workers=${3:-12}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$((SECONDS + total))

# run COMMAND...: the command, or in a dry run the line saying what it would run
run() {
	if ((dry)); then
		echo "(dry run) would run: $*"
	else
		"$@"
	fi
}

# step NAME SECONDS COMMAND...: run with at most SECONDS (and no later than the deadline), log to OUT_DIR/NAME.log;
# in a dry run only logged (DRY_REAL=1 runs it anyway: the steps that have a CPU form)
step() {
	local name=$1 cap=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
	shift 2
	[[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || return 0
	((left < cap)) && cap=$left
	if ((cap < 10)); then
		echo "== $name: skipped, no time left"
		return
	fi
	if ((dry)) && [[ -z ${DRY_REAL:-} ]]; then
		run "$@" >"$out/$name.log" 2>&1
	else
		timeout -k 5 "$cap" "$@" >"$out/$name.log" 2>&1
	fi
	rc=$?
	echo "== $name: exit $rc in $((SECONDS - start)) s (limit $cap s)"
	tail -n "${TAIL:-12}" "$out/$name.log"
}

{
	if ((dry)); then
		echo "dry run: no GPU used; $(nproc) CPUs"
		"$py" -c "import torch; print('torch', torch.__version__)"
		"$py" -c "import triton; print('triton', triton.__version__)"
	else
		nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
		"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
		"$py" -c "import triton; print('triton', triton.__version__)"
		# whether the torch backend's block-FP8 products run as F.scaled_mm here (its self-check), or dequantise
		"$py" -c "from tp_infer.backends.reference import scaled_mm_works; print('block-FP8 scaled_mm:', scaled_mm_works(0))"
		"$py" -c "from tp_infer.backends import pick; print('backend auto on cuda:', pick('auto', 'cuda', 'bf16').name)"
		nproc
	fi
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# the cuda backend's Triton kernels compiled for real (the test file takes the GPU when there is one) against float64
# oracles and the torch backend; in a dry run under Triton's interpreter on the CPU
# every kernel variant compiled ahead of time for the GPU's architecture (Hopper in a dry run): no GPU needed
arch=90
((dry)) || arch=$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
DRY_REAL=1 TAIL=3 step compile 120 "$py" scripts/compile_kernels.py --arch "$arch"
if ((dry)); then
	DRY_REAL=1 TRITON_INTERPRET=1 TAIL=5 step triton 120 "$py" -m pytest -q -p no:cacheprovider -rfE \
		tests/test_triton_kernels.py tests/test_triton_router.py
	DRY_REAL=1 TAIL=20 step bench_decode 120 "$py" scripts/bench_decode.py --dry-run --out "$out/decode.json"
	DRY_REAL=1 TAIL=8 step bench_cuda_step 120 "$py" scripts/bench_cuda_step.py --dry-run --out "$out/cuda_step.json"
else
	TAIL=8 step triton 120 "$py" -m pytest -q -p no:cacheprovider -rfE --durations=5 tests/test_triton_kernels.py \
		tests/test_triton_router.py
	# paged MLA decode, the Triton kernel against the torch backend, at V2-Lite's and V3's widths, batch 1 and 64,
	# 1K and 16K of history: time per decode group against the bytes it must read over the measured bandwidth
	TAIL=22 step bench_decode 90 "$py" scripts/bench_decode.py --out "$out/decode.json"
	# one decode step of V2-Lite's real structure (random FP8 and bf16 weights, TP 1) at batch 1, 8 and 64, 1K and 16K
	# of history: torch backend, cuda backend, cuda backend held as the engine's --cuda-graphs holds it (a CUDA graph
	# over static buffers; each capture's time and pool memory printed after the table), against the bandwidth floor
	TAIL=20 step bench_cuda_step 180 "$py" scripts/bench_cuda_step.py --out "$out/cuda_step.json"
fi

# the demo's conversation on the GPU: its answers name what earlier turns said
demo=$out/demo-mp1
run "$py" scripts/convert.py --hf-ckpt-path demo/model --save-path "$demo" --model-parallel 1 >"$out/convert.log" 2>&1
for dtype in fp32 bf16; do
	printf '%s\n' "My name is Alice." "I live in Lisbon." "The code for door is 4821." "What is my name?" \
		"Where do I live?" "What is the code for door?" "/stats" >"$out/demo.in"
	TAIL=40 step "demo-$dtype" 90 "$py" -m tp_infer.generate --ckpt-path "$demo" --interactive --device cuda \
		--dtype "$dtype" --max-new-tokens 32 --system "You are a helpful assistant." <"$out/demo.in"
done

# the same conversation with the cuda backend's decode step captured as CUDA graphs for batches of 1, 2 and 4
# (start-up says how long each capture took and the memory of the graphs' pool, or why it runs eager)
TAIL=40 step demo-bf16-cuda-graphs 120 "$py" -m tp_infer.generate --ckpt-path "$demo" --interactive --device cuda \
	--dtype bf16 --max-new-tokens 32 --max-batch-size 4 --backend cuda --cuda-graphs \
	--system "You are a helpful assistant." <"$out/demo.in"

# and through the torch backend's compiled decode step replayed as CUDA graphs (start-up says how long compiling
# and capturing took, or why it runs eager)
TAIL=40 step demo-bf16-graphs 150 "$py" -m tp_infer.generate --ckpt-path "$demo" --interactive --device cuda \
	--dtype bf16 --max-new-tokens 32 --max-batch-size 2 --compile --cuda-graphs --system "You are a helpful assistant." \
	<"$out/demo.in"

# -v names each test as it ends, so a run cut short by its limit still says which failed
TAIL=60 TP_INFER_TEST_DEVICE=cuda step suite 300 "$py" -m pytest -v -p no:cacheprovider -n "$workers" \
	--dist loadfile -rfE --tb=short --durations=10 tests

bench=(--device cuda)
step profile_step 60 "$py" scripts/profile_step.py "${bench[@]}" --out "$out/profile.json"
step bench_vs_vllm 60 "$py" scripts/bench_vs_vllm.py "${bench[@]}" --out "$out/vs_vllm.json"
TAIL=25 step bench_multiturn 120 "$py" scripts/bench_multiturn.py "${bench[@]}" --out "$out/multiturn.json"
TAIL=40 step bench_serving 150 "$py" scripts/bench_serving.py "${bench[@]}" --users 16 --out "$out/serving.json" \
	--plot "$out/serving.png"
step bench_pool 90 "$py" scripts/bench_pool.py "${bench[@]}" --out "$out/pool.json"
step bench_tiers 120 "$py" scripts/bench_tiers.py "${bench[@]}" --out "$out/tiers.json"
step bench_kv_cache 60 "$py" scripts/bench_kv_cache.py "${bench[@]}"
