#!/usr/bin/env bash
# `ftune init-model` end to end: the default (float32, mt19937) output stays byte-identical to
# what it was before --dtype/--fast_init existed; --dtype bfloat16 --fast_init true writes bf16
# tensors and a bfloat16 config, the same bytes for 1 and 2 OpenMP threads.
# usage: test_init_model_cli.sh FTUNE SOURCE_DIR SCRATCH_DIR
set -uo pipefail
FTUNE=$1 S=$3/init_model_cli
rm -rf "$S"; mkdir -p "$S"
fail() { echo "FAIL: $*"; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
SMALL=(--hidden_size 32 --num_hidden_layers 2 --intermediate_size 48
       --num_attention_heads 4 --num_key_value_heads 2)

# 1. Defaults. The hashes were taken from the binary before this test existed; they depend on
#    libstdc++'s normal_distribution, which the default path keeps on purpose.
"$FTUNE" init-model --output "$S/default" >/dev/null || fail "init-model with defaults"
[ "$(sha "$S/default/model.safetensors")" = ea54b0ddab8f609f079424ac97f8199909a35e7f4f5ed209ea75ce6335062972 ] ||
  fail "default init-model weights changed"
"$FTUNE" init-model --output "$S/qwen2" --model_type qwen2 "${SMALL[@]}" --vocab_size 64 --seed 7 \
  --initializer_range 0.1 --tie_word_embeddings true >/dev/null || fail "init-model qwen2"
[ "$(sha "$S/qwen2/model.safetensors")" = f5bc1ddf6e932bdf29740287088663fbee9a86eae665e57769fc34b3cfd89622 ] ||
  fail "qwen2 init-model weights changed"
grep -q '"torch_dtype": "float32"' "$S/default/config.json" || fail "default config.json is not float32"

# 2. bf16 + fast init, on 1 and 2 threads.
for t in 1 2; do
  OMP_NUM_THREADS=$t "$FTUNE" init-model --output "$S/fast$t" --model_type qwen3 "${SMALL[@]}" \
    --vocab_size 5000 --seed 3 --dtype bfloat16 --fast_init true >"$S/fast$t.log" 2>&1 ||
    { cat "$S/fast$t.log"; fail "init-model --dtype bfloat16 --fast_init true"; }
done
cmp -s "$S/fast1/model.safetensors" "$S/fast2/model.safetensors" ||
  fail "fast init differs between 1 and 2 threads"
grep -q '"torch_dtype": "bfloat16"' "$S/fast1/config.json" || fail "config.json is not bfloat16"
params=$(sed -n 's/.*(\([0-9]*\) parameters).*/\1/p' "$S/fast1.log")
python3 - "$S/fast1/model.safetensors" "$params" <<'PY' || fail "bf16 safetensors header"
import json, os, struct, sys
path, params = sys.argv[1], int(sys.argv[2])
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
header.pop("__metadata__", None)
dtypes = {v["dtype"] for v in header.values()}
assert dtypes == {"BF16"}, dtypes
assert os.path.getsize(path) == 8 + n + 2 * params, (os.path.getsize(path), n, params)
PY

# 3. --weights on_load: config.json and the seed only (test_io_weight_source checks the load).
"$FTUNE" init-model --output "$S/onload" --model_type qwen3 "${SMALL[@]}" --seed 3 \
  --weights on_load >"$S/onload.log" 2>&1 || { cat "$S/onload.log"; fail "--weights on_load"; }
grep -q "made on load" "$S/onload.log" || fail "on_load: no 'made on load' in its output"
[ -f "$S/onload/ftune_random_init.json" ] && [ -f "$S/onload/config.json" ] ||
  fail "on_load: config.json or ftune_random_init.json missing"
[ -e "$S/onload/model.safetensors" ] && fail "on_load wrote model.safetensors"
grep -q '"seed": 3' "$S/onload/ftune_random_init.json" || fail "on_load: seed not recorded"
"$FTUNE" init-model --output "$S/fast1" --weights on_load >/dev/null 2>&1 &&
  fail "on_load into a directory with model.safetensors accepted"

# 4. Refusals.
"$FTUNE" init-model --output "$S/bad" --dtype float16 >/dev/null 2>&1 && fail "--dtype float16 accepted"
exit 0
