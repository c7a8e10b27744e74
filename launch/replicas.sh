#!/usr/bin/env bash
# N replicas of the tp_infer server on this machine, each its own torchrun group, behind the Shepherd Model Gateway
# (smg, pip install smg) with session affinity: one command.
#
#   launch/replicas.sh CKPT [serve options...]
#
# Replica i listens on 127.0.0.1:PORT+i; once every replica answers /health, smg starts in front of them on
# GATEWAY_HOST:GATEWAY_PORT. Clients send each conversation's id in the X-SMG-Routing-Key header: the gateway's
# consistent_hashing policy sends every turn of it to one replica, where its history is cached (cache-aware routing
# on the text piles conversations that open with the same system prompt onto one replica and moves them when it
# rebalances; see README, "Many replicas"). When a replica dies, the gateway's health checks take it out of the
# ring and its conversations move to the others, which recompute their histories.
#
# Environment: REPLICAS      number of replicas (default 2)
#              NPROC         ranks per replica: one number for all, or one per replica, comma-separated ("1,2");
#                            default: GPUs / REPLICAS, else 1 on CPU. On GPUs replica i gets the next NPROC GPUs
#              PORT          first replica's port (default 8001); GATEWAY_PORT (default 8000); METRICS_PORT the
#                            gateway's Prometheus metrics (default GATEWAY_PORT + 10000, on GATEWAY_HOST)
#              GATEWAY_HOST  where the gateway listens (default 127.0.0.1: reachable from this machine only; open
#                            it with GATEWAY_HOST=0.0.0.0 and GATEWAY_API_KEY set)
#              GATEWAY_API_KEY  clients must send `Authorization: Bearer KEY` to the gateway, which passes it on to
#                            the replicas (started with the same key)
#              POLICY        smg's routing policy (default consistent_hashing)
#              OVERLOAD_WAITING  requests waiting on a replica at which the gateway sends new turns elsewhere
#                            (default: never; smg's own default, 8, moves busy replicas' conversations away from
#                            their history, which the other replica then recomputes whole)
#              HEALTH_INTERVAL  seconds between the gateway's health checks of each replica (default 2); a replica
#                            is out after 2 failed ones in a row
#              START_TIMEOUT seconds a replica may take to answer /health (default 1800: weights load)
#              LOG_DIR       replica-I.log and gateway.log (default: a new folder under TMPDIR)
#              PYTHON        interpreter (default python3 on PATH); SMG  gateway (default: smg beside PYTHON, else
#                            on PATH); SMG_OPTS  more smg options, split on spaces
# Each line "replicas: replica I ... pid P" on stderr names the torchrun of replica I. SIGTERM or SIGINT stops the
# gateway and every replica; the script exits 0 then. If the gateway ends by itself, the replicas are stopped and
# the script exits with its status.
set -euo pipefail

if [ $# -lt 1 ]; then
	echo "usage: $0 CKPT [serve options...]" >&2
	exit 2
fi
ckpt=$1
shift
PYTHON=${PYTHON:-python3}
REPLICAS=${REPLICAS:-2}
PORT=${PORT:-8001}
GATEWAY_PORT=${GATEWAY_PORT:-8000}
GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
METRICS_PORT=${METRICS_PORT:-$((GATEWAY_PORT + 10000))}
POLICY=${POLICY:-consistent_hashing}
HEALTH_INTERVAL=${HEALTH_INTERVAL:-2}
START_TIMEOUT=${START_TIMEOUT:-1800}
SMG=${SMG:-$(dirname -- "$(command -v "$PYTHON")")/smg}
[ -x "$SMG" ] || SMG=smg
command -v "$SMG" >/dev/null || {
	echo "$0: the gateway (smg) is not installed: pip install smg" >&2
	exit 2
}
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/tp_infer_replicas.XXXXXX")}
mkdir -p "$LOG_DIR"

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
IFS=, read -r -a nprocs <<<"${NPROC:-}"
if [ ${#nprocs[@]} -eq 0 ]; then
	per=$((gpus > 0 ? gpus / REPLICAS : 1))
	[ "$per" -gt 0 ] || per=1
	nprocs=("$per")
fi
if [ ${#nprocs[@]} -ne 1 ] && [ ${#nprocs[@]} -ne "$REPLICAS" ]; then
	echo "$0: NPROC=$NPROC: give one number, or one per replica ($REPLICAS)" >&2
	exit 2
fi
overload=(--disable-worker-overload-protection)
if [ -n "${OVERLOAD_WAITING:-}" ]; then overload=(--worker-overload-waiting-requests "$OVERLOAD_WAITING"); fi
auth=()
if [ -n "${GATEWAY_API_KEY:-}" ]; then auth=(--api-key "$GATEWAY_API_KEY"); fi

pids=() urls=() stopping=''
# shellcheck disable=SC2317  # called by the traps and at the end
stop_all() {
	for pid in ${gateway:-} "${pids[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
	for pid in ${gateway:-} "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
# shellcheck disable=SC2317,SC2329  # called by the traps (SC2329 from shellcheck 0.11 on)
on_signal() {
	stopping=1
	echo "replicas: SIG$1 received, stopping the gateway and the replicas" >&2
	stop_all
	exit 0
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

first_gpu=0
for ((i = 0; i < REPLICAS; i++)); do
	n=${nprocs[$((${#nprocs[@]} == 1 ? 0 : i))]}
	port=$((PORT + i))
	env_gpus=()
	if [ "$gpus" -gt 0 ]; then
		env_gpus=(env "CUDA_VISIBLE_DEVICES=$(seq -s, "$first_gpu" $((first_gpu + n - 1)))")
		first_gpu=$((first_gpu + n))
	fi
	# its own session: a Ctrl-C in the terminal reaches this script alone, which stops each replica once
	setsid "${env_gpus[@]}" "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$n" \
		-m tp_infer.serve --ckpt-path "$ckpt" --host 127.0.0.1 --port "$port" "${auth[@]}" "$@" \
		>"$LOG_DIR/replica-$i.log" 2>&1 &
	pids+=($!)
	urls+=("http://127.0.0.1:$port")
	echo "replicas: replica $i ($n ranks) on http://127.0.0.1:$port, pid $!, log $LOG_DIR/replica-$i.log" >&2
done

healthy() { # URL: whether it answers /health with 200
	"$PYTHON" -c 'import sys, urllib.request
try:
    sys.exit(urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status != 200)
except Exception:
    sys.exit(1)' "$1"
}
deadline=$((SECONDS + START_TIMEOUT))
for ((i = 0; i < REPLICAS; i++)); do
	until healthy "${urls[$i]}"; do
		if ! kill -0 "${pids[$i]}" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
			echo "replicas: replica $i did not come up; its log:" >&2
			tail -n 20 "$LOG_DIR/replica-$i.log" >&2
			stop_all
			exit 1
		fi
		sleep 0.5
	done
done
echo "replicas: $REPLICAS replicas healthy; gateway on http://$GATEWAY_HOST:$GATEWAY_PORT, log $LOG_DIR/gateway.log" >&2

# shellcheck disable=SC2086  # SMG_OPTS is split on purpose
setsid "$SMG" launch --worker-urls "${urls[@]}" --policy "$POLICY" --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" \
	--prometheus-host "$GATEWAY_HOST" --prometheus-port "$METRICS_PORT" \
	--health-check-interval-secs "$HEALTH_INTERVAL" --health-failure-threshold 2 "${overload[@]}" "${auth[@]}" \
	${SMG_OPTS:-} >"$LOG_DIR/gateway.log" 2>&1 &
gateway=$!
status=0
wait "$gateway" || status=$?
[ -n "$stopping" ] || echo "replicas: the gateway ended (status $status); stopping the replicas" >&2
stop_all
exit "$status"
