#!/usr/bin/env bash
# Run tp_infer on this machine under torchrun --standalone, with the torch of the current Python (a venv works).
#
#   launch/run_local.sh CKPT IN.jsonl OUT.jsonl [generate options...]   batch job
#   launch/run_local.sh CKPT --interactive [generate options...]        console on rank 0
#   launch/run_local.sh CKPT --serve [serve options...]                 OpenAI-compatible server on rank 0
#
# Environment: NPROC   ranks (default: the number of GPUs, else 2 on CPU; the checkpoint needs shards for it)
#              PYTHON  interpreter (default: python3 on PATH)
# Exit status of a batch job: 0 done; 75 stopped by SIGTERM/SIGINT at a step boundary, rerun the same command to
# resume; anything else failed. torchrun exits 1 whichever worker failed and however, so rank 0's own status is
# read from a file that rank 0 writes as it exits.
# torchrun runs in a session of its own (setsid), out of reach of the terminal's signals: this script passes each
# signal on itself, once. A batch job's first SIGTERM/SIGINT goes to torchrun, which passes it to the ranks; the
# console's Ctrl-C goes to rank 0 alone, which stops the reply (torchrun would take it as the end of the session).
# The server stops on SIGTERM or SIGINT (Ctrl-C) and exits 0.
set -euo pipefail

usage() {
	echo "usage: $0 CKPT (IN.jsonl OUT.jsonl | --interactive | --serve) [options...]" >&2
	exit 2
}
[ $# -ge 2 ] || usage
ckpt=$1
shift
PYTHON=${PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
	NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
	[ "$NPROC" -gt 0 ] || NPROC=2
fi
torchrun=("$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC")
module=tp_infer.generate
if [ "$1" = --serve ]; then
	shift
	module=tp_infer.serve mode=() output=""
elif [ "$1" = --interactive ]; then
	shift
	mode=(--interactive) output=""
	if ! command -v setsid >/dev/null; then # Ctrl-C then ends the session, as with torchrun itself
		exec "${torchrun[@]}" -m "$module" --ckpt-path "$ckpt" "${mode[@]}" "$@"
	fi
else
	[ $# -ge 2 ] || usage
	output=$2
	mode=(--input-file "$1" --output-file "$2")
	shift 2
fi
detach=()
if command -v setsid >/dev/null; then detach=(setsid); fi

pid_file=$(mktemp "${TMPDIR:-/tmp}/tp_infer_pid.XXXXXX")
status_file=$(mktemp "${TMPDIR:-/tmp}/tp_infer_exit.XXXXXX")
trap 'rm -f "$pid_file" "$status_file"' EXIT

signalled='' child='' traps=0
# shellcheck disable=SC2317,SC2329  # called by the traps (SC2329 from shellcheck 0.11 on)
on_signal() {
	traps=$((traps + 1))
	if [ "${mode[0]:-}" = --interactive ] && [ "$1" = INT ]; then
		local pid
		pid=$(cat "$pid_file")
		if [ -n "$pid" ]; then kill -s INT "$pid" 2>/dev/null || true; fi
		return 0
	fi
	# once only: torchrun abandons its workers when signalled three times while it waits for them
	[ -z "$signalled" ] || return 0
	signalled=$1
	if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'on_signal TERM' TERM HUP
trap 'on_signal INT' INT
# in the background, so that the traps run at once (and then with this shell's stdin: the console reads it)
"${detach[@]}" "${torchrun[@]}" -m "$module" --pid-file "$pid_file" --exit-status-file "$status_file" \
	--ckpt-path "$ckpt" "${mode[@]}" "$@" <&0 &
child=$!
if [ -n "$signalled" ]; then kill -s "$signalled" "$child" 2>/dev/null || true; fi
while :; do
	seen=$traps status=0
	wait "$child" || status=$?
	# a trap cut `wait` short (status 128 + signal): wait again, for torchrun's own status
	if [ "$status" -le 128 ] || [ "$traps" = "$seen" ]; then break; fi
done

rank0=$(cat "$status_file")
if [ "$module" = tp_infer.serve ] && [ "$rank0" = 0 ]; then
	exit 0 # stopped as asked; torchrun reports the signal it passed on as a failure
fi
if [ "$rank0" = 75 ]; then
	echo "$0: stopped at a step boundary; rerun the same command to resume $output" >&2
	exit 75
fi
exit "$status"
