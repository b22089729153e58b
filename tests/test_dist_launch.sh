#!/usr/bin/env bash
# Launchers end to end on the CPU backend: mpirun -np 2 and the torchrun-style wrapper with two
# "nodes" on this machine give the same losses; the wrapper fails cleanly on a rank failure, a
# closed rendezvous port, and ranks whose configurations differ; `ftune doctor` passes; ZeRO-3
# full fine-tuning equals ZeRO-2 bit for bit under both launchers.
# usage: test_dist_launch.sh FTUNE SOURCE_DIR SCRATCH_DIR
set -uo pipefail
FTUNE=$1 SRC=$2 S=$3/dist_launch
rm -rf "$S"; mkdir -p "$S"
fail() { echo "FAIL: $*"; exit 1; }
MPIRUN="mpirun --oversubscribe --allow-run-as-root -np 2"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
losses() { python3 -c 'import json,sys; print(" ".join(repr(json.loads(l)["loss"]) for l in open(sys.argv[1]) if "\"loss\"" in l))' "$1"; }

"$FTUNE" init-model --output "$S/model" --hidden_size 32 --num_hidden_layers 2 --vocab_size 64 \
  --intermediate_size 48 --num_attention_heads 2 --num_key_value_heads 1 >/dev/null || fail "init-model"
mkdir -p "$S/data"
python3 - "$S/data/train.jsonl" <<'PY'
import json, random, sys
r = random.Random(3)
with open(sys.argv[1], "w") as f:
    for _ in range(48):
        ids = [r.randrange(3, 64) for _ in range(r.randrange(6, 20))]
        f.write(json.dumps({"input_ids": ids, "labels": [-100] * 3 + ids[3:]}) + "\n")
PY
ARGS=(--model_name_or_path "$S/model" --train_file_dir "$S/data" --max_steps 5 --logging_steps 1
      --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --learning_rate 0.01
      --lora_dropout 0.1 --zero_stage 1 --overwrite_output_dir true --device cpu)
export OMP_NUM_THREADS=1

# 1. mpirun
$MPIRUN "$FTUNE" train "${ARGS[@]}" --output_dir "$S/mpi" > "$S/mpi.log" 2>&1 || { cat "$S/mpi.log"; fail "mpirun run"; }
grep -q "world: 2 ranks (launcher mpi)" "$S/mpi.log" || fail "mpirun run did not form a 2-rank world"

# 2. the torchrun wrapper, two nodes of one process each
P=$(free_port)
run_node() {  # node_rank out_dir log [extra args]
  local n=$1 out=$2 log=$3; shift 3
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$P NODE_RANK=$n WORLD_SIZE=2 NPROC_PER_NODE=1 FTUNE="$FTUNE" \
    FTUNE_RENDEZVOUS_TIMEOUT=30 bash "$SRC/tools/torchrun_multi_node_multi_gpu.sh" "${ARGS[@]}" \
    --output_dir "$out" "$@" > "$log" 2>&1
}
run_node 0 "$S/tr" "$S/node0.log" & n0=$!
run_node 1 "$S/tr" "$S/node1.log" & n1=$!
wait $n0; r0=$?; wait $n1; r1=$?
[ $r0 -eq 0 ] && [ $r1 -eq 0 ] || { cat "$S/node0.log" "$S/node1.log"; fail "wrapper nodes exited $r0/$r1"; }
grep -q "world: 2 ranks (launcher env)" "$S/node0.log" || fail "wrapper run did not form a 2-rank world"
lm=$(losses "$S/mpi/metrics.jsonl"); lt=$(losses "$S/tr/metrics.jsonl")
[ -n "$lm" ] && [ "$lm" = "$lt" ] || fail "losses differ: mpirun [$lm] vs wrapper [$lt]"
echo "ok: mpirun and 2-node wrapper give the same losses: $lm"

# 3. ranks with different configurations fail together, naming the problem
P=$(free_port)
run_node 0 "$S/fp" "$S/fp0.log" & n0=$!
run_node 1 "$S/fp" "$S/fp1.log" --learning_rate 0.02 & n1=$!
wait $n0; r0=$?; wait $n1; r1=$?
[ $r0 -ne 0 ] && [ $r1 -ne 0 ] || fail "mismatched configurations were not refused ($r0/$r1)"
grep -q "ranks disagree on" "$S/fp0.log" || { cat "$S/fp0.log"; fail "no consistency message"; }
grep -q "learning_rate" "$S/fp0.log" || { cat "$S/fp0.log"; fail "consistency message does not name learning_rate"; }
echo "ok: mismatched configurations refused on both nodes"

# 4. nobody at the rendezvous: fails within the deadline, saying what to check
P=$(free_port)
start=$(date +%s)
MASTER_ADDR=127.0.0.1 MASTER_PORT=$P NODE_RANK=1 WORLD_SIZE=2 NPROC_PER_NODE=1 FTUNE="$FTUNE" \
  FTUNE_RENDEZVOUS_TIMEOUT=3 bash "$SRC/tools/torchrun_multi_node_multi_gpu.sh" "${ARGS[@]}" \
  --output_dir "$S/np" > "$S/np.log" 2>&1 && fail "rank 1 without rank 0 succeeded"
took=$(( $(date +%s) - start ))
grep -q "MASTER_ADDR" "$S/np.log" && grep -q "$P" "$S/np.log" || { cat "$S/np.log"; fail "no rendezvous hint"; }
[ $took -lt 30 ] || fail "rendezvous failure took ${took}s"
echo "ok: unreachable rendezvous fails in ${took}s with a hint"

# 5. doctor, under mpirun and under the wrapper
$MPIRUN "$FTUNE" doctor --train_file_dir "$S/data" --output_dir "$S/doc" --allreduce_mib 4 > "$S/doc.log" 2>&1 \
  || { cat "$S/doc.log"; fail "doctor under mpirun"; }
grep -q "all checks passed on 2 rank(s)" "$S/doc.log" || fail "doctor summary"
grep -q "busbw" "$S/doc.log" || fail "doctor bandwidth line"
P=$(free_port)
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$P "$FTUNE" doctor --allreduce_mib 4 > "$S/docenv$r.log" 2>&1 &
done
wait
grep -q "all checks passed on 2 rank(s)" "$S/docenv0.log" || { cat "$S/docenv0.log"; fail "doctor under env launcher"; }
echo "ok: doctor passes under mpirun and the env launcher"
# 6. text data with a cache: rank 0 tokenizes and writes it, the other rank reads it
CFG=(--config "$SRC/inputs/default.toml" --model_name_or_path "$SRC/inputs/tiny-llama"
     --tokenizer_name_or_path "$SRC/inputs/tiny-tokenizer" --train_file_dir "$SRC/inputs/data/sharegpt/train"
     --validation_file_dir "$SRC/inputs/data/sharegpt/validation" --max_steps 2 --eval_steps 0
     --cache_dir "$S/cache" --output_dir "$S/text")
(cd "$S" && mpirun --oversubscribe --allow-run-as-root -np 2 "$FTUNE" train "${CFG[@]}") > "$S/text1.log" 2>&1 \
  || { tail -20 "$S/text1.log"; fail "2-rank text run"; }
ls "$S"/cache/ftune-data-*.h5 >/dev/null 2>&1 || fail "no dataset cache written"
grep -q "train data: 480 examples" "$S/text1.log" || fail "train data line"
(cd "$S" && mpirun --oversubscribe --allow-run-as-root -np 2 "$FTUNE" train "${CFG[@]}") > "$S/text2.log" 2>&1 \
  || { tail -20 "$S/text2.log"; fail "2-rank text run from the cache"; }
grep -q "train data: 480 examples.*\[cache\]" "$S/text2.log" || { grep "train data" "$S/text2.log"; fail "second run did not read the cache"; }
echo "ok: 2-rank text run builds the dataset cache once and reads it after"
# 7. ZeRO-3 full fine-tuning (block gathers and gradient flushes over the launcher's
#    collectives): mpirun (MPI) and the wrapper (TCP) give the same losses as ZeRO-2
ZARGS=(--model_name_or_path "$S/model" --train_file_dir "$S/data" --max_steps 4 --logging_steps 1
       --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --learning_rate 0.001
       --use_peft false --overwrite_output_dir true --device cpu --save_only_model true)
$MPIRUN "$FTUNE" train "${ZARGS[@]}" --zero_stage 2 --output_dir "$S/z2" > "$S/z2.log" 2>&1 \
  || { tail -20 "$S/z2.log"; fail "ZeRO-2 full fine-tuning under mpirun"; }
$MPIRUN "$FTUNE" train "${ZARGS[@]}" --zero_stage 3 --output_dir "$S/z3" > "$S/z3.log" 2>&1 \
  || { tail -20 "$S/z3.log"; fail "ZeRO-3 full fine-tuning under mpirun"; }
grep -q "this rank owns" "$S/z3.log" || fail "ZeRO-3 full fine-tuning log line"
P=$(free_port)
for n in 0 1; do
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$P NODE_RANK=$n WORLD_SIZE=2 NPROC_PER_NODE=1 FTUNE="$FTUNE" \
    FTUNE_RENDEZVOUS_TIMEOUT=30 bash "$SRC/tools/torchrun_multi_node_multi_gpu.sh" "${ZARGS[@]}" \
    --zero_stage 3 --output_dir "$S/z3tcp" > "$S/z3tcp$n.log" 2>&1 &
done
wait
grep -q "world: 2 ranks (launcher env)" "$S/z3tcp0.log" || { tail -20 "$S/z3tcp0.log" "$S/z3tcp1.log"; fail "ZeRO-3 wrapper run"; }
l2=$(losses "$S/z2/metrics.jsonl"); l3=$(losses "$S/z3/metrics.jsonl"); lt=$(losses "$S/z3tcp/metrics.jsonl")
[ -n "$l2" ] && [ "$l2" = "$l3" ] && [ "$l3" = "$lt" ] || fail "ZeRO-3 losses: ZeRO-2 [$l2] mpirun [$l3] wrapper [$lt]"
cmp -s "$S/z2/model/model.safetensors" "$S/z3/model/model.safetensors" || fail "ZeRO-3 model differs from ZeRO-2's"
cmp -s "$S/z3/model/model.safetensors" "$S/z3tcp/model/model.safetensors" || fail "ZeRO-3 model: mpirun vs wrapper"
echo "ok: ZeRO-3 full fine-tuning = ZeRO-2 bit for bit under mpirun and the wrapper: $l3"
echo "test_dist_launch: all checks passed"
