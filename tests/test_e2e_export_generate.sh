#!/usr/bin/env bash
# ctest: bash tests/test_e2e_export_generate.sh <ftune-binary> <source-dir> <scratch-dir>
# `ftune export --merge` and `ftune generate` as a user runs them: train the embedded default
# briefly, merge the adapter into the tiny Llama, and check that the exported directory (single
# file and sharded) loads back and decodes greedily exactly as base + adapter does; sampling is
# reproducible by seed; --input JSONL gives one {"prompt", "completion"} line per prompt; bad
# input (missing adapter dir, no --merge, non-empty output) fails with a clear message.
# Exit 0 pass, 1 fail, 77 skip.
set -u
BIN="${1:?usage: test_e2e_export_generate.sh <ftune-binary> <source-dir> <scratch-dir>}"
SRC="${2:?usage: test_e2e_export_generate.sh <ftune-binary> <source-dir> <scratch-dir>}"
SCRATCH="${3:?usage: test_e2e_export_generate.sh <ftune-binary> <source-dir> <scratch-dir>}"
WORK="$SCRATCH/e2e_export_generate"

fail() { echo "FAIL: $*"; exit 1; }
[ -x "$BIN" ] || { echo "SKIP: $BIN not built"; exit 77; }
for f in inputs/default.toml inputs/tiny-llama/config.json inputs/tiny-tokenizer/tokenizer.json; do
  [ -f "$SRC/$f" ] || { echo "SKIP: $SRC/$f missing"; exit 77; }
done
rm -rf "$WORK" && mkdir -p "$WORK" || fail "cannot create $WORK"
cd "$SRC" || fail "cannot cd to $SRC"

# run NAME ARGS...: runs ftune, stdout to $WORK/NAME.out, stderr to $WORK/NAME.err; returns its rc.
run() {
  local name="$1"; shift
  "$BIN" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
}
# expect_error NAME PATTERN ARGS...: ftune must fail with PATTERN in stderr.
expect_error() {
  local name="$1" pattern="$2"; shift 2
  if run "$name" "$@"; then fail "$name: ftune $* succeeded"; fi
  grep -q -- "$pattern" "$WORK/$name.err" ||
    fail "$name: no '$pattern' in stderr: $(cat "$WORK/$name.err")"
  echo "ok: $name -> $(grep -m1 -- "$pattern" "$WORK/$name.err")"
}

# ---- a briefly trained adapter
run train train --config inputs/default.toml --max_steps 20 --output_dir "$WORK/train" ||
  fail "training failed: $(tail -5 "$WORK/train.err")"
ADAPTER="$WORK/train/adapter"
[ -f "$ADAPTER/adapter_model.safetensors" ] || fail "no adapter written"

# ---- export --merge: config, weights and the tokenizer files
MERGED="$WORK/merged"
run export export --model inputs/tiny-llama --adapter "$ADAPTER" --tokenizer inputs/tiny-tokenizer \
  --output "$MERGED" --merge || fail "export failed: $(cat "$WORK/export.err")"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
  [ -f "$MERGED/$f" ] || fail "export wrote no $f"
done
echo "ok: $(cat "$WORK/export.out")"

# ---- greedy: merged model (its own tokenizer copy) == base + adapter, token for token
PROMPT="What should I do about a mild headache?"
GEN=(--prompt "$PROMPT" --template vicuna --max_new_tokens 40)
run gen_merged generate --model "$MERGED" "${GEN[@]}" || fail "generate (merged): $(cat "$WORK/gen_merged.err")"
run gen_adapter generate --model inputs/tiny-llama --tokenizer inputs/tiny-tokenizer \
  --adapter "$ADAPTER" "${GEN[@]}" || fail "generate (adapter): $(cat "$WORK/gen_adapter.err")"
run gen_base generate --model inputs/tiny-llama --tokenizer inputs/tiny-tokenizer "${GEN[@]}" ||
  fail "generate (base): $(cat "$WORK/gen_base.err")"
[ -s "$WORK/gen_merged.out" ] || fail "empty completion"
cmp -s "$WORK/gen_merged.out" "$WORK/gen_adapter.out" ||
  fail "merged model and base + adapter differ: '$(cat "$WORK/gen_merged.out")' vs '$(cat "$WORK/gen_adapter.out")'"
cmp -s "$WORK/gen_merged.out" "$WORK/gen_base.out" &&
  fail "the adapter changed nothing: base model gives the same completion"
echo "ok: greedy completion (merged == base + adapter): $(cat "$WORK/gen_merged.out")"

# ---- sharded export loads back the same (index + shards); stale files of the first export go
run export_sharded export --model inputs/tiny-llama --adapter "$ADAPTER" --tokenizer inputs/tiny-tokenizer \
  --output "$MERGED" --merge --overwrite --max_shard_size 1MB ||
  fail "sharded export failed: $(cat "$WORK/export_sharded.err")"
[ -f "$MERGED/model.safetensors.index.json" ] || fail "no model.safetensors.index.json"
[ -f "$MERGED/model.safetensors" ] && fail "stale model.safetensors left next to the shards"
shards=$(ls "$MERGED"/model-*-of-*.safetensors 2>/dev/null | wc -l)
[ "$shards" -ge 2 ] || fail "expected several shards, found $shards"
run gen_sharded generate --model "$MERGED" "${GEN[@]}" || fail "generate (sharded): $(cat "$WORK/gen_sharded.err")"
cmp -s "$WORK/gen_sharded.out" "$WORK/gen_merged.out" || fail "sharded export decodes differently"
echo "ok: $shards shards, same completion"

# ---- the trainer's loader and forward agree: the first step's loss (before any update, no
# dropout) of merged model + fresh adapter (B = 0) == base model + the trained adapter.
step1_loss() {  # NAME ARGS...: trains one step, prints the logged step-1 loss
  local name="$1"; shift
  run "$name" train --config inputs/default.toml --max_steps 1 --logging_steps 1 --lora_dropout 0 \
    --eval_steps 0 --output_dir "$WORK/$name" "$@" || fail "$name failed: $(tail -5 "$WORK/$name.err")"
  grep -m1 '"step":1,' "$WORK/$name/metrics.jsonl" | sed 's/.*"loss":\([^,}]*\).*/\1/'
}
loss_merged=$(step1_loss train_merged --model_name_or_path "$MERGED")
loss_lora=$(step1_loss train_lora --init_adapter "$ADAPTER")
awk -v a="$loss_merged" -v b="$loss_lora" 'BEGIN { d = a - b; if (d < 0) d = -d;
  exit !(a > 0 && d <= 1e-5 * b) }' ||
  fail "step-1 loss: merged model $loss_merged vs base + adapter $loss_lora"
echo "ok: step-1 training loss, merged $loss_merged == base + adapter $loss_lora"

# ---- sampling: same seed, same text
SAMPLE=(generate --model "$MERGED" "${GEN[@]}" --temperature 0.9 --top_k 40 --top_p 0.95 --seed 11)
run sample1 "${SAMPLE[@]}" || fail "sampling failed: $(cat "$WORK/sample1.err")"
run sample2 "${SAMPLE[@]}" || fail "sampling failed: $(cat "$WORK/sample2.err")"
cmp -s "$WORK/sample1.out" "$WORK/sample2.out" || fail "sampling with one seed is not reproducible"
echo "ok: seeded sampling reproducible: $(cat "$WORK/sample1.out")"

# ---- --input JSONL: one output line per prompt, the greedy completion as with --prompt
printf '{"prompt": "%s"}\n\n{"prompt": "How can I sleep better?"}\n' "$PROMPT" >"$WORK/prompts.jsonl"
run jsonl generate --model "$MERGED" --input "$WORK/prompts.jsonl" --template vicuna --max_new_tokens 40 ||
  fail "--input failed: $(cat "$WORK/jsonl.err")"
[ "$(wc -l <"$WORK/jsonl.out")" -eq 2 ] || fail "expected 2 JSONL lines: $(cat "$WORK/jsonl.out")"
head -1 "$WORK/jsonl.out" | grep -q '^{"prompt":"What should I do about a mild headache?","completion":' ||
  fail "unexpected JSONL line: $(head -1 "$WORK/jsonl.out")"
echo "ok: --input JSONL"

# ---- errors
expect_error missing_adapter "adapter directory '$WORK/no-such-adapter' not found" \
  export --model inputs/tiny-llama --adapter "$WORK/no-such-adapter" --output "$WORK/x" --merge
expect_error missing_adapter_gen "adapter directory '$WORK/no-such-adapter' not found" \
  generate --model inputs/tiny-llama --tokenizer inputs/tiny-tokenizer --adapter "$WORK/no-such-adapter" --prompt hi
expect_error no_merge "only --merge is implemented" \
  export --model inputs/tiny-llama --adapter "$ADAPTER" --output "$WORK/x"
expect_error not_empty "is not empty; pass --overwrite" \
  export --model inputs/tiny-llama --adapter "$ADAPTER" --output "$MERGED" --merge
expect_error no_tokenizer "has no tokenizer.json; pass --tokenizer" \
  generate --model inputs/tiny-llama --prompt hi
[ -e "$WORK/x" ] && fail "a failed export left $WORK/x behind"
ls -a "$WORK" | grep -q '\.tmp-' && fail "a temporary export directory was left in $WORK"

echo "PASS"
exit 0
