#!/usr/bin/env bash
# CI's check that all CUDA code compiles, on a machine without a GPU (CI has none, and no
# CUDA 12). Needs Debian's nvidia-cuda-toolkit (11.8, non-free; tools/install_deps.sh installs
# it with FTUNE_CUDA_COMPILE_CHECK=1) and its host compiler g++-11. It compiles:
#   - every src/**/*.cu and tools/*.cu for sm_80 (CUDA 11.8 knows no sm_90a; the kernels use
#     only sm_80 instructions: mma.sync, ldmatrix, cp.async), objects thrown away;
#   - the host C++ that builds only with the CUDA backend (FTUNE_HAVE_CUDA: the trainer's
#     backend choice, the GPU step runner, the test_cuda_* tests), with the flags CMake
#     gave the CPU build (build/compile_commands.json; run tools/build.sh first).
# NCCL has no Debian package: src/nccl/ is compiled on the GPU machine only.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
HOSTCXX=${CUDA_HOST_CXX:-g++-11}
ARCH=${CUDA_ARCH:-80}
[ -n "$NVCC" ] || { echo "ci_compile_cuda: no nvcc (install_deps.sh with FTUNE_CUDA_COMPILE_CHECK=1)" >&2; exit 1; }
[ -f "${BUILD_DIR:=build}/compile_commands.json" ] || { echo "ci_compile_cuda: build/compile_commands.json missing (run tools/build.sh)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "[ci_compile_cuda] $("$NVCC" --version | grep release), host $HOSTCXX, sm_$ARCH"
failed=()
n=0
for f in $(git ls-files 'src/*.cu' 'tools/*.cu'); do
  n=$((n + 1))
  "$NVCC" -ccbin "$HOSTCXX" -std=c++17 -O1 -Iinclude -DFTUNE_HAVE_CUDA=1 \
    -gencode "arch=compute_$ARCH,code=sm_$ARCH" -c "$f" -o "$out/obj.o" || failed+=("$f")
done
echo "[ci_compile_cuda] $n .cu files compiled"
# Host files: the CPU build's own command, with the CUDA backend's define, syntax only.
python3 - "$out" <<'PY' || failed+=("host C++ under FTUNE_HAVE_CUDA")
import json, os, shlex, subprocess, sys
root = os.getcwd()
cmds = {os.path.relpath(c["file"], root): c for c in json.load(open(os.environ.get("BUILD_DIR", "build") + "/compile_commands.json"))}
def compile_as(src, like):
    c = cmds[like]
    args = shlex.split(c["command"]) if "command" in c else list(c["arguments"])
    i = args.index("-o"); del args[i:i + 2]
    args = [a for a in args if a != "-c" and os.path.relpath(os.path.join(c["directory"], a), root) != like]
    args += ["-DFTUNE_HAVE_CUDA=1", "-fsyntax-only", os.path.join(root, src)]
    return subprocess.run(args, cwd=c["directory"]).returncode
files = [(f, f) for f in ("src/train/trainer.cpp", "src/train/trainer_setup.cpp", "src/train/step_runner.cpp",
                          "src/train/cuda_step_runner.cpp")]
files += [(os.path.join("tests", t), "tests/test_e2e_reference.cpp")
          for t in sorted(os.listdir("tests")) if t.startswith("test_cuda_") and t.endswith(".cpp")]
bad = [f for f, like in files if compile_as(f, like) != 0]
print(f"[ci_compile_cuda] {len(files)} host files checked" + (f"; failed: {bad}" if bad else ""))
sys.exit(1 if bad else 0)
PY
if [ ${#failed[@]} -gt 0 ]; then
  echo "[ci_compile_cuda] FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "[ci_compile_cuda] ok"
