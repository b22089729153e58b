#!/usr/bin/env bash
# A rank killed with SIGKILL mid-training brings the whole job down with a non-zero exit
# within 60 s, with a message naming the rank, under mpirun and under the torchrun-style
# wrapper; no half-written checkpoint looks valid, and the run resumes from the latest one.
# usage: test_dist_fault.sh FTUNE SOURCE_DIR SCRATCH_DIR
set -uo pipefail
FTUNE=$1 SRC=$2 S=$3/dist_fault
rm -rf "$S"; mkdir -p "$S"
fail() { echo "FAIL: $*"; exit 1; }
export OMP_NUM_THREADS=1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$FTUNE" init-model --output "$S/model" --hidden_size 32 --num_hidden_layers 2 --vocab_size 64 \
  --intermediate_size 48 --num_attention_heads 2 --num_key_value_heads 1 >/dev/null || fail "init-model"
mkdir -p "$S/data"
python3 -c '
import json, random
r = random.Random(5)
with open("'"$S"'/data/train.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"input_ids": [r.randrange(3, 64) for _ in range(12)]}) + "\n")'
ARGS=(--model_name_or_path "$S/model" --train_file_dir "$S/data" --max_steps 1000000
      --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --learning_rate 0.001
      --lr_scheduler_type constant --save_steps 3 --save_total_limit 2 --logging_steps 1
      --overwrite_output_dir true)

# pid of this test's ftune rank writing to output dir $1 whose environment has $2=$3 (the
# output dir keeps other jobs on the machine, e.g. another test under ctest -j, out of reach)
pid_with_env() {
  local out=$1 var=$2 val=$3 p
  for p in $(pgrep -f "$FTUNE train .*--output_dir $out"); do
    tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "$var=$val" && { echo "$p"; return; }
  done
}
wait_for_steps() {  # metrics file, count (up to 120 s: a loaded 2-core CI runs other tests beside)
  for _ in $(seq 1 1200); do
    [ -f "$1" ] && [ "$(grep -c '"loss"' "$1")" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}
check_checkpoints() {  # every checkpoint-N directory that looks valid is complete and loadable
  local out=$1 d
  for d in "$out"/checkpoint-*; do
    [ -d "$d" ] || continue
    case "$d" in *.tmp) continue ;; esac
    [ -f "$d/COMPLETE" ] || fail "$d has no COMPLETE marker but looks like a checkpoint"
    for f in adapter.h5 trainer_state.h5; do [ -s "$d/$f" ] || fail "$d/$f missing"; done
  done
}

# ---- mpirun: kill rank 1
mpirun --oversubscribe --allow-run-as-root -np 2 "$FTUNE" train "${ARGS[@]}" --output_dir "$S/mpi" \
  > "$S/mpi.log" 2>&1 &
job=$!
wait_for_steps "$S/mpi/metrics.jsonl" 10 || { kill $job; cat "$S/mpi.log"; fail "mpirun run did not start"; }
victim=$(pid_with_env "$S/mpi" OMPI_COMM_WORLD_RANK 1)
[ -n "$victim" ] || { kill $job; fail "rank 1 not found"; }
t0=$(date +%s.%N); kill -9 "$victim"
wait $job; rc=$?
took=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
[ $rc -ne 0 ] || fail "mpirun exited 0 after rank 1 was killed"
python3 -c "import sys; sys.exit(0 if $took < 60 else 1)" || fail "job took ${took}s to stop"
grep -Eq "rank 1" "$S/mpi.log" || { tail -20 "$S/mpi.log"; fail "mpirun output does not name rank 1"; }
check_checkpoints "$S/mpi"
echo "ok: mpirun job stopped ${took}s after rank 1 was killed (exit $rc); checkpoints valid"

# resume from the latest valid checkpoint on 2 ranks
last=$(ls -d "$S"/mpi/checkpoint-* | grep -v '\.tmp$' | sed 's/.*checkpoint-//' | sort -n | tail -1)
[ -n "$last" ] || fail "no checkpoint left to resume from"
mpirun --oversubscribe --allow-run-as-root -np 2 "$FTUNE" train "${ARGS[@]}" --output_dir "$S/mpi" \
  --max_steps $((last + 2)) --resume_from_checkpoint latest > "$S/resume.log" 2>&1 \
  || { tail -20 "$S/resume.log"; fail "resume after the crash"; }
grep -q "resumed from .*checkpoint-$last at step $last" "$S/resume.log" || fail "did not resume from checkpoint-$last"
echo "ok: resumed from checkpoint-$last after the crash"

# ---- torchrun wrapper (TCP): kill rank 1
P=$(free_port)
MASTER_ADDR=127.0.0.1 MASTER_PORT=$P NODE_RANK=0 WORLD_SIZE=1 NPROC_PER_NODE=2 FTUNE="$FTUNE" \
  bash "$SRC/tools/torchrun_multi_node_multi_gpu.sh" "${ARGS[@]}" --output_dir "$S/tcp" > "$S/tcp.log" 2>&1 &
job=$!
wait_for_steps "$S/tcp/metrics.jsonl" 10 || { kill $job; cat "$S/tcp.log"; fail "wrapper run did not start"; }
victim=$(pid_with_env "$S/tcp" RANK 1)
[ -n "$victim" ] || { kill $job; fail "rank 1 not found"; }
t0=$(date +%s.%N); kill -9 "$victim"
wait $job; rc=$?
took=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
[ $rc -ne 0 ] || fail "wrapper exited 0 after rank 1 was killed"
python3 -c "import sys; sys.exit(0 if $took < 60 else 1)" || fail "job took ${took}s to stop"
grep -q "rank 1" "$S/tcp.log" || { tail -20 "$S/tcp.log"; fail "wrapper output does not name rank 1"; }
check_checkpoints "$S/tcp"
echo "ok: wrapper job stopped ${took}s after rank 1 was killed (exit $rc); checkpoints valid"
echo "test_dist_fault: all checks passed"
