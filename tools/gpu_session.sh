#!/usr/bin/env bash
# For the lent GPU machine (no package registry there): builds ftune with the Debian headers
# carried in .deb/root (TOML++, and pcre2/utf8proc where the machine lacks them) and links
# the carried copy of ../shared (.devshare) so GPU tests that use it do not skip. Then runs
# the steps named on the command line, logging each to $OUT/STEP.log:
#   build  test  lora  gemm  bench  bench_sel  profile  (lora: tools/bench_lora.cpp; gemm:
#   tools/bench_gemm.cpp; bench/profile: 8B shape, batch 4, checkpointing on, ftune alone
#   (bench_sel: the same with selective_recompute; PROFILE_ARGS: more train arguments for
#   profile); hf: HF+PEFT eager and compiled on the same case (hf_eager: eager only);
#   quant: 200 steps of the benchmark's data on the 1B shape in bf16, int8 and NF4 weights;
#   attn: our flash attention against torch SDPA at the issue's two shapes; big:
#   tools/bench_big_models.py, the cases in $BIG_CASES, default all; shape:mode:batch:ranks
#   runs mpirun -np ranks, e.g. 70b:bf16+zero3:1:2 on a 2-GPU kind)
# Prepare here first (both folders are git-ignored):
#   mkdir -p .deb && (cd .deb && apt-get download libtomlplusplus-dev libutf8proc-dev \
#     libutf8proc2 libpcre2-dev libpcre2-8-0 && for f in *.deb; do dpkg -x $f root; done)
#   mkdir -p .devshare && cp -r ../shared/data .devshare/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ftune_out}
mkdir -p "$OUT"
DEB=$PWD/.deb/root
if [ -d "$DEB" ]; then
  export CMAKE_PREFIX_PATH=$DEB/usr
  if ! pkg-config --exists libutf8proc libpcre2-8 2>/dev/null; then
    export PKG_CONFIG_LIBDIR=$DEB/usr/lib/x86_64-linux-gnu/pkgconfig PKG_CONFIG_SYSROOT_DIR=$DEB
    export LD_LIBRARY_PATH=$DEB/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  fi
fi
[ -e ../shared ] || { [ -d .devshare ] && ln -s "$PWD/.devshare" ../shared; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORK=${FTUNE_BENCH_WORK:-/tmp/ftune_bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

step() {
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[gpu_session] $name rc=$rc $((SECONDS - t0)) s"
  return $rc
}

for s in "$@"; do
  case $s in
    build) step build bash -c "cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build --parallel $(nproc)" || { tail -40 "$OUT/build.log"; exit 1; } ;;
    test) step test ctest --test-dir build -L gpu --output-on-failure --timeout 600
          grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/test.log" | tail -20 ;;
    lora) step lora build/bench_lora "$OUT/bench_lora.json"; cat "$OUT/lora.log" ;;
    hf) step hf python3 tools/bench_train.py --ftune build/ftune --out "$OUT/bench" --work "$WORK" \
          --shapes 8b --batches 4 --checkpointing on --impls hf_eager,hf_compiled --steps 5 --warmup 3 --timeout 250 --tag hf
        tail -8 "$OUT/hf.log" ;;
    hf_eager) step hf_eager python3 tools/bench_train.py --ftune build/ftune --out "$OUT/bench" --work "$WORK" \
          --shapes 8b --batches 4 --checkpointing on --impls hf_eager --steps 5 --warmup 3 --timeout 250 --tag hf_eager
        tail -8 "$OUT/hf_eager.log" ;;
    bench) step bench python3 tools/bench_train.py --ftune build/ftune --out "$OUT/bench" --work "$WORK" \
             --shapes 8b --batches 4 --checkpointing on --impls ftune --steps 6 --warmup 2
           tail -8 "$OUT/bench.log" ;;
    bench_sel) step bench_sel python3 tools/bench_train.py --ftune build/ftune --out "$OUT/bench" \
                 --work "$WORK" --shapes 8b --batches 4 --checkpointing on --impls ftune --steps 6 \
                 --warmup 2 --tag selective --extra_args="--selective_recompute true"
               tail -8 "$OUT/bench_sel.log" ;;
    gemm) step gemm build/bench_gemm "$OUT/bench_gemm.json"; cat "$OUT/gemm.log" ;;
    profile) step profile env FTUNE_PROFILE=1 build/ftune train --model_name_or_path "$WORK/model_8b" \
               --train_file_dir "$WORK/data_8b.jsonl" --output_dir /tmp/ftune_prof --overwrite_output_dir true \
               --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_steps 4 \
               --gradient_checkpointing true --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
               --logging_steps 1 --validation_split_percentage 0 --model_max_length 2048 --save_steps 0 \
               ${PROFILE_ARGS:-}
             tail -25 "$OUT/profile.log" ;;
    quant) step quant bash tools/gpu_quant_gap.sh build/ftune "$WORK" "$OUT/quant"
           cat "$OUT/quant/quant_gap.md" ;;
    attn) step attn bash -c "build/tests/test_cuda_attention -tc='*timing*' -s > $OUT/attn_ours.log 2>&1; \
            python3 tools/bench_attention.py --ours $OUT/attn_ours.log --out $OUT/attention_bench.md"
          cat "$OUT/attention_bench.md" ;;
    big) step big python3 tools/bench_big_models.py --ftune build/ftune --out "$OUT/big" \
           ${BIG_CASES:+--cases "$BIG_CASES"}
         tail -12 "$OUT/big.log" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
# The device tool returns at most 8 files: the benchmark folders travel as one archive.
[ -d "$OUT/bench" ] && tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
[ -d "$OUT/big" ] && tar czf "$OUT/big.tgz" -C "$OUT" big && rm -rf "$OUT/big"
exit 0
