#!/usr/bin/env bash
# ctest: bash tests/test_plot_metrics.sh <ftune-binary> <source-dir> <scratch-dir>
# Checks tools/plot_metrics.py: a sample metrics.jsonl becomes a real PNG (signature, > 5 KB), the
# default output lands next to the input, and bad input (malformed line, empty, missing file)
# fails with a message naming the file (and line). Exit 0 pass, 1 fail, 77 skip (no Python with
# matplotlib).
set -u
SRC="${2:?usage: test_plot_metrics.sh <ftune-binary> <source-dir> <scratch-dir>}"
SCRATCH="${3:?usage: test_plot_metrics.sh <ftune-binary> <source-dir> <scratch-dir>}"
TOOL="$SRC/tools/plot_metrics.py"
WORK="$SCRATCH/plot_metrics"

fail() { echo "FAIL: $*"; exit 1; }

[ -f "$TOOL" ] || fail "$TOOL not found"

# An interpreter that imports matplotlib: $FTUNE_PYTHON, python3 on PATH, then Debian's.
PY=""
tried=""
for cand in ${FTUNE_PYTHON:-} python3 /usr/bin/python3 /usr/local/bin/python3; do
  command -v "$cand" >/dev/null 2>&1 || continue
  tried="$tried $cand"
  if "$cand" -c 'import matplotlib' >/dev/null 2>&1; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
  echo "SKIP: no Python with matplotlib (tried:${tried:- none}); apt-get install python3-matplotlib"
  exit 77
fi
echo "using $PY ($("$PY" -c 'import sys, matplotlib; print(sys.version.split()[0], "matplotlib", matplotlib.__version__)'))"

rm -rf "$WORK" && mkdir -p "$WORK" || fail "cannot create $WORK"

# --- sample metrics: 40 steps, eval_loss on separate lines every 10 steps, extra keys ignored
"$PY" - "$WORK/metrics.jsonl" <<'EOF' || fail "could not write the sample metrics"
import json, math, sys
with open(sys.argv[1], "w") as f:
    tokens = 0
    for step in range(1, 41):
        lr = 2e-4 * min(1.0, step / 5) * 0.5 * (1 + math.cos(math.pi * max(0, step - 5) / 35))
        n = 900 + (step * 37) % 200
        tokens += n
        f.write(json.dumps({"step": step, "epoch": step / 40, "loss": 2.5 * math.exp(-step / 15) + 0.8
                            + 0.05 * math.sin(step), "lr": lr, "grad_norm": 1.5 / math.sqrt(step),
                            "tokens": tokens, "tokens_per_s": 1200 + 80 * math.sin(step / 3),
                            "step_time_s": n / 1200.0}) + "\n")
        if step % 10 == 0:
            f.write(json.dumps({"step": step, "eval_loss": 2.0 * math.exp(-step / 20) + 1.0}) + "\n")
    f.write("\n")  # a trailing blank line is fine
EOF

check_png() {  # file
  [ -f "$1" ] || fail "$1 was not written"
  local sig size
  sig=$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')
  [ "$sig" = "89504e470d0a1a0a" ] || fail "$1 does not start with the PNG signature (got $sig)"
  size=$(wc -c <"$1")
  [ "$size" -gt 5120 ] || fail "$1 is only $size bytes"
  echo "ok: $1 ($size bytes)"
}

out=$("$PY" "$TOOL" "$WORK/metrics.jsonl" -o "$WORK/plot.png" 2>&1) || fail "tool failed: $out"
check_png "$WORK/plot.png"

out=$("$PY" "$TOOL" "$WORK/metrics.jsonl" 2>&1) || fail "tool failed without -o: $out"
check_png "$WORK/metrics.png"

# --- only some keys present (no lr, no tokens_per_s) still plots
printf '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n' >"$WORK/partial.jsonl"
out=$("$PY" "$TOOL" "$WORK/partial.jsonl" -o "$WORK/partial.png" 2>&1) || fail "partial metrics: $out"
check_png "$WORK/partial.png"

# --- bad input: non-zero exit and a message naming the file (and line)
expect_error() {  # description, expected substring, args...
  local what="$1" want="$2"; shift 2
  local msg rc
  msg=$("$PY" "$TOOL" "$@" 2>&1); rc=$?
  [ $rc -ne 0 ] || fail "$what: exit status 0"
  case "$msg" in *"$want"*) ;; *) fail "$what: message does not name '$want': $msg" ;; esac
  echo "ok: $what -> exit $rc: $msg"
}

head -n 2 "$WORK/metrics.jsonl" >"$WORK/bad.jsonl"
echo '{"step": 3, "loss": 2.1, "lr": ' >>"$WORK/bad.jsonl"
head -n 5 "$WORK/metrics.jsonl" | tail -n 2 >>"$WORK/bad.jsonl"
expect_error "malformed line 3" "bad.jsonl:3" "$WORK/bad.jsonl" -o "$WORK/bad.png"
[ ! -e "$WORK/bad.png" ] || fail "a PNG was written for malformed input"

printf '{"step": 1, "loss": 2.0}\n[1, 2]\n' >"$WORK/notobj.jsonl"
expect_error "non-object line 2" "notobj.jsonl:2" "$WORK/notobj.jsonl" -o "$WORK/x.png"

printf '{"loss": 2.0}\n' >"$WORK/nostep.jsonl"
expect_error "line without step" "nostep.jsonl:1" "$WORK/nostep.jsonl" -o "$WORK/x.png"

: >"$WORK/empty.jsonl"
expect_error "empty file" "empty.jsonl: empty" "$WORK/empty.jsonl" -o "$WORK/x.png"

expect_error "missing file" "nope.jsonl: no such file" "$WORK/nope.jsonl" -o "$WORK/x.png"

echo "test_plot_metrics: all checks passed"
exit 0
