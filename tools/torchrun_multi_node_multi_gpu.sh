#!/usr/bin/env bash
# torchrun-style launcher for ftune, with the seed script's interface:
#   MASTER_ADDR (localhost)  MASTER_PORT (29500)  NODE_RANK (0)
#   WORLD_SIZE  (number of NODES, 1)             NPROC_PER_NODE (4)
# Run it once per node; it starts NPROC_PER_NODE local ranks of `ftune train "$@"` with
# torchrun's variables (RANK, WORLD_SIZE = total ranks, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT). Rank 0 (node 0, local rank 0) serves the rendezvous.
# Exits non-zero if any local rank fails, and then stops the others.
#   FTUNE=path/to/ftune  (default: build/ftune next to this script, else ftune on PATH)
set -uo pipefail

MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-0}
NNODES=${WORLD_SIZE:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${FTUNE:-}" ]; then
  if [ -x "$here/build/ftune" ]; then FTUNE="$here/build/ftune"; else FTUNE=ftune; fi
fi
for v in NODE_RANK NNODES NPROC_PER_NODE MASTER_PORT; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then echo "torchrun wrapper: $v='${!v}' is not a number" >&2; exit 2; fi
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "torchrun wrapper: NODE_RANK=$NODE_RANK but WORLD_SIZE (nodes) is $NNODES" >&2; exit 2
fi

total=$((NNODES * NPROC_PER_NODE))
echo "[torchrun wrapper] node $NODE_RANK/$NNODES: starting $NPROC_PER_NODE ranks of $total," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT"
pids=()
for ((i = 0; i < NPROC_PER_NODE; i++)); do
  RANK=$((NODE_RANK * NPROC_PER_NODE + i)) WORLD_SIZE=$total LOCAL_RANK=$i \
  LOCAL_WORLD_SIZE=$NPROC_PER_NODE GROUP_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR \
  MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    "$FTUNE" train "$@" &
  pids+=($!)
done

stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'stop_all; exit 130' INT TERM

# Wait for the first rank to end; a failure stops the rest of this node's ranks.
status=0
remaining=${#pids[@]}
while [ "$remaining" -gt 0 ]; do
  wait -n -p done_pid; rc=$?
  remaining=$((remaining - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    for idx in "${!pids[@]}"; do [ "${pids[$idx]}" = "$done_pid" ] && r=$((NODE_RANK * NPROC_PER_NODE + idx)); done
    echo "[torchrun wrapper] rank ${r:-?} (pid $done_pid) exited with status $rc; stopping the others" >&2
    status=$rc
    stop_all
  fi
done
exit "$status"
