#!/usr/bin/env bash
# ctest: bash tests/test_slurm.sh <ftune-binary> <source-dir> <scratch-dir>
# Starts a real one-node Slurm (Debian's slurmctld + slurmd + munge, a generated slurm.conf,
# loopback only, private ports, everything under the scratch dir), checks it with `srun` and a
# trivial batch job, then submits slurm/ftune_single_node.sbatch with 2 tasks on the CPU
# (`sbatch --wait`) training a tiny model for 3 steps, and checks the job's exit code, the
# adapter, metrics.jsonl and that the extra arguments reached `ftune train`; then, when the
# binary has them, `ftune doctor` through the same script and the job again with --mpi=pmix.
# The daemons and every process of the test's jobs are stopped on exit, whatever happens.
# Takes about 15-30 s; every wait has a timeout (worst case well under 3 minutes).
#
# Exit 0 pass, 1 fail, 77 skip (with the reason): Slurm/munge not installed, not root, or Slurm
# cannot run here (the reason is taken from the daemons' logs).
#
# Environment:
#   FTUNE_TEST_SLURM_WORLD=auto|2|off  (default auto) whether the 2 srun tasks must form ONE
#       ftune world: the job log must then show "[ftune] world: 2 ranks" once, and only rank 0
#       may write metrics. auto = required when the ftune binary reads SLURM_PROCID (i.e. it
#       has the Slurm launcher); otherwise each task runs as its own single rank and the
#       world check is reported as not yet enabled.
#   FTUNE_TEST_SLURM_MPI=auto|1|0  (default auto) also run the job with SRUN_ARGS=--mpi=pmix;
#       auto = when the world check is on, ftune links libmpi and `srun --mpi=list` has pmix.
#   FTUNE_TEST_SLURM_REQUIRED=1  a Slurm that cannot start is a failure, not a skip (CI).
#   FTUNE_TEST_SLURM_KEEP=1      keep the daemons' state directory (logs are always kept).
set -u
FTUNE="${1:?usage: test_slurm.sh <ftune-binary> <source-dir> <scratch-dir>}"
SRC="${2:?usage: test_slurm.sh <ftune-binary> <source-dir> <scratch-dir>}"
SCRATCH="${3:?usage: test_slurm.sh <ftune-binary> <source-dir> <scratch-dir>}"
SCRIPT="$SRC/slurm/ftune_single_node.sbatch"
WORLD_MODE="${FTUNE_TEST_SLURM_WORLD:-auto}"
T0=$SECONDS

say() { echo "[test_slurm +$((SECONDS - T0))s] $*"; }
fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }

# ---------------------------------------------------------------- prerequisites
[ -x "$FTUNE" ] || fail "ftune binary '$FTUNE' not found or not executable"
[ -f "$SCRIPT" ] || fail "$SCRIPT not found"
case "$WORLD_MODE" in auto|2|off) ;; *) fail "FTUNE_TEST_SLURM_WORLD='$WORLD_MODE' (use auto, 2 or off)";; esac
missing=""
for tool in slurmctld slurmd srun sbatch sinfo squeue scontrol scancel munged munge; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing="$missing $tool"
done
[ -z "$missing" ] ||
  skip "Slurm/munge not installed (missing:$missing); apt-get install slurmctld slurmd slurm-client munge (tools/install_deps.sh)"
export PATH="$PATH:/usr/sbin:/sbin"
if [ "$(id -u)" != 0 ]; then
  # slurmd starts job steps as the submitting user and needs root for it. A CI runner with
  # passwordless sudo re-runs the test as root (and gets its scratch files back at the end).
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "[test_slurm] not root: re-running under sudo -n"
    exec sudo -n env PATH="$PATH" FTUNE_TEST_SLURM_OWNER="$(id -u):$(id -g)" \
      FTUNE_TEST_SLURM_WORLD="${FTUNE_TEST_SLURM_WORLD:-auto}" \
      FTUNE_TEST_SLURM_MPI="${FTUNE_TEST_SLURM_MPI:-auto}" \
      FTUNE_TEST_SLURM_REQUIRED="${FTUNE_TEST_SLURM_REQUIRED:-0}" \
      FTUNE_TEST_SLURM_KEEP="${FTUNE_TEST_SLURM_KEEP:-0}" bash "$0" "$@"
  fi
  skip "needs root (or passwordless sudo): slurmd must run as root to start job steps"
fi

FTUNE="$(cd "$(dirname "$FTUNE")" && pwd)/$(basename "$FTUNE")"
mkdir -p "$SCRATCH" || fail "cannot create $SCRATCH"
WORK="$(cd "$SCRATCH" && pwd)/slurm"
rm -rf "$WORK" && mkdir -p "$WORK/log" "$WORK/job" || fail "cannot create $WORK"

# Daemon state: unix socket paths are limited to 108 bytes (munge socket, slurmd's step
# sockets in SlurmdSpoolDir), so a long scratch path gets a short directory under /tmp.
if [ ${#WORK} -le 48 ]; then
  RUN="$WORK/run"; mkdir -p "$RUN"
else
  RUN="$(mktemp -d /tmp/ftslurm.XXXXXX)" || fail "mktemp failed"
fi
chmod 755 "$RUN"
mkdir -p "$RUN/munge-key" "$RUN/munge" "$RUN/state" "$RUN/spool" "$RUN/tmp"
chmod 700 "$RUN/munge-key"
chmod 755 "$RUN/munge"

# A Slurm (or MPI) job around ctest must not leak into the test's own cluster.
for name in $(compgen -e); do
  case "$name" in SLURM_*|SBATCH_*|SRUN_*|SALLOC_*|SQUEUE_*|SINFO_*|PMI_*|PMIX_*|OMPI_*) unset "$name";; esac
done
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
export SLURM_CONF="$RUN/slurm.conf"

# Every daemon and job process of this test carries TAG in its environment, so cleanup can find
# exactly them (slurmstepd and the job's tasks are not our children).
TAG="ftune-slurm-test-$$-$RANDOM"
PIDS=()

tagged_pids() {
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    { tr '\0' '\n' <"$f"; } 2>/dev/null | grep -qx "FTUNE_SLURM_TEST_TAG=$TAG" && echo "$pid"
  done
}

cleanup() {
  local rc=$? p i left
  set +e
  trap - EXIT INT TERM
  if [ ${#PIDS[@]} -gt 0 ]; then
    # Cancel whatever is still queued or running while the controller is up.
    if kill -0 "${PIDS[1]:-0}" 2>/dev/null; then
      ids=$(timeout 5 squeue -h -o %i 2>/dev/null)
      [ -n "$ids" ] && timeout 5 scancel --full $ids 2>/dev/null
      for i in 1 2 3 4 5 6 7 8 9 10; do
        [ -z "$(timeout 3 squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
    # slurmd, slurmctld, then munged (the reverse of the start order).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null; done
    for i in $(seq 1 20); do
      left=0
      for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
      [ "$left" = 0 ] && break
      sleep 0.25
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    # Left-over slurmstepd / job tasks / slurmscriptd of this test, found by TAG.
    left=$(tagged_pids)
    if [ -n "$left" ]; then
      echo "[test_slurm] stopping left-over processes: $(echo $left)"
      kill -TERM $left 2>/dev/null; sleep 1
      left=$(tagged_pids); [ -n "$left" ] && kill -KILL $left 2>/dev/null
    fi
    wait 2>/dev/null
  fi
  [ -n "${FTUNE_TEST_SLURM_OWNER:-}" ] && chown -R "$FTUNE_TEST_SLURM_OWNER" "$WORK" 2>/dev/null
  if [ "${FTUNE_TEST_SLURM_KEEP:-0}" != 1 ]; then
    rm -rf "$RUN"
  else
    echo "[test_slurm] kept $RUN"
  fi
  echo "[test_slurm] daemons stopped; logs in $WORK/log (total $((SECONDS - T0))s)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The reason Slurm does not work, from the daemons' logs (errors first, then the tails).
LOG_NOISE="Could not open .*state file|NOTE: Trying backup|No .*state file to recover|MailProg|differs from hardware"
log_errors() {  # the error lines of every log, noise removed
  grep -iE "error|fatal|fail|denied|cannot|unable|refused|invalid" "$@" 2>/dev/null | grep -vE "$LOG_NOISE"
}
slurm_reason() {
  local f
  for f in "$WORK"/log/*; do
    [ -s "$f" ] || continue
    echo "---- $(basename "$f"): errors"
    log_errors "$f" | tail -n 8
    echo "---- $(basename "$f"): last lines"
    tail -n 4 "$f"
  done
}
infra_fail() {  # Slurm itself does not work: skip (or fail when required) with the reason
  local why first
  why="$*"
  first=$(log_errors -h "$WORK"/log/*.log "$WORK"/log/*.out | grep -iE "fatal|error" | head -n 1)
  [ -n "$first" ] && why="$why; first error logged: $first"
  echo "Slurm could not run here: $why"
  slurm_reason
  if [ "${FTUNE_TEST_SLURM_REQUIRED:-0}" = 1 ]; then fail "Slurm did not work (FTUNE_TEST_SLURM_REQUIRED=1): $why"; fi
  skip "Slurm could not run in this environment: $why (logs above and in $WORK/log; FTUNE_TEST_SLURM_REQUIRED=1 makes this a failure)"
}

# ---------------------------------------------------------------- ports (loopback)
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {  # a port nobody listens on, not in $*
  local p
  for _ in $(seq 1 50); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))  # below the ephemeral range
    case " $* " in *" $p "*) continue;; esac
    port_busy "$p" || { echo "$p"; return 0; }
  done
  return 1
}
CTLD_PORT=16817; SLURMD_PORT=16818
if port_busy "$CTLD_PORT" || port_busy "$SLURMD_PORT"; then
  CTLD_PORT=$(pick_port) && SLURMD_PORT=$(pick_port "$CTLD_PORT") || fail "no free TCP ports"
fi
RDV_PORT=$(pick_port "$CTLD_PORT" "$SLURMD_PORT") || fail "no free TCP port for the rendezvous"

# ---------------------------------------------------------------- munge
if command -v mungekey >/dev/null 2>&1; then
  mungekey --create --keyfile="$RUN/munge-key/munge.key" >"$WORK/log/mungekey.out" 2>&1 ||
    fail "mungekey failed: $(cat "$WORK/log/mungekey.out")"
else
  dd if=/dev/urandom of="$RUN/munge-key/munge.key" bs=1 count=1024 status=none || fail "cannot write a munge key"
fi
chmod 600 "$RUN/munge-key/munge.key"
MUNGE_SOCKET="$RUN/munge/munge.socket"
env FTUNE_SLURM_TEST_TAG="$TAG" munged --foreground --force \
  --socket="$MUNGE_SOCKET" --key-file="$RUN/munge-key/munge.key" \
  --log-file="$WORK/log/munged.log" --pid-file="$RUN/munge/munged.pid" \
  --seed-file="$RUN/munge/munged.seed" >"$WORK/log/munged.out" 2>&1 &
PIDS+=($!)
for i in $(seq 1 40); do [ -S "$MUNGE_SOCKET" ] && break; kill -0 "${PIDS[0]}" 2>/dev/null || break; sleep 0.25; done
[ -S "$MUNGE_SOCKET" ] || infra_fail "munged did not start"
munge -S "$MUNGE_SOCKET" -n 2>"$WORK/log/munge-check.out" | unmunge -S "$MUNGE_SOCKET" >>"$WORK/log/munge-check.out" 2>&1 ||
  infra_fail "munge round trip failed: $(tail -n 3 "$WORK/log/munge-check.out")"
say "munged up (socket $MUNGE_SOCKET)"

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s 2>/dev/null || uname -n)
HOST=${HOST%%.*}  # slurmctld must run on the host SlurmctldHost names
# The node's name is the job's MASTER_ADDR (first host of the nodelist): it must resolve.
NODE=$HOST
getent hosts "$NODE" >/dev/null 2>&1 || NODE=localhost
NCPU=$(nproc 2>/dev/null || echo 1)
[ "$NCPU" -ge 2 ] || NCPU=2  # 2 tasks must fit; config_overrides lets slurmd accept more CPUs than it has
cat >"$SLURM_CONF" <<EOF
# generated by tests/test_slurm.sh: a one-node cluster on loopback, state under $RUN
ClusterName=ftunetest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
TmpFS=$RUN/tmp
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$NCPU RealMemory=1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF

# ---------------------------------------------------------------- slurmctld + slurmd
env FTUNE_SLURM_TEST_TAG="$TAG" slurmctld -D -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 &
PIDS+=($!)
env FTUNE_SLURM_TEST_TAG="$TAG" slurmd -D -f "$SLURM_CONF" -N "$NODE" >"$WORK/log/slurmd.out" 2>&1 &
PIDS+=($!)
state=""
for i in $(seq 1 120); do  # up to 30 s
  kill -0 "${PIDS[1]}" 2>/dev/null || infra_fail "slurmctld exited"
  kill -0 "${PIDS[2]}" 2>/dev/null || infra_fail "slurmd exited"
  state=$(timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null)
  [ "$state" = idle ] && break
  sleep 0.25
done
[ "$state" = idle ] || infra_fail "node $NODE not idle after 30 s (sinfo state: '${state:-no answer}')"
say "slurmctld + slurmd up, node $NODE idle ($NCPU CPUs, ports $CTLD_PORT/$SLURMD_PORT)"

# ---------------------------------------------------------------- Slurm itself: srun, sbatch
out=$(env FTUNE_SLURM_TEST_TAG="$TAG" timeout 20 srun -N 1 -n 2 --ntasks-per-node=2 -t 1 -J hello \
      bash -c 'echo "task $SLURM_PROCID/$SLURM_NTASKS local $SLURM_LOCALID on $(hostname)"' 2>&1)
rc=$?
echo "$out" | sed 's/^/  srun: /'
[ $rc = 0 ] || infra_fail "'srun -n 2' exited with $rc: $(echo "$out" | tail -n 2)"
[ "$(echo "$out" | grep -c '^task [01]/2 local [01] ')" = 2 ] || infra_fail "'srun -n 2' did not start 2 tasks"
env FTUNE_SLURM_TEST_TAG="$TAG" timeout 20 sbatch --wait -N 1 -n 2 --ntasks-per-node=2 -t 1 -J hello-batch \
  -D "$WORK/job" -o "$WORK/job/hello-%j.out" \
  --wrap 'echo "nodes: $(scontrol show hostnames "$SLURM_JOB_NODELIST")"; srun hostname' >"$WORK/log/hello-sbatch.out" 2>&1
rc=$?
cat "$WORK/log/hello-sbatch.out" "$WORK"/job/hello-*.out 2>/dev/null | sed 's/^/  sbatch: /'
[ $rc = 0 ] || infra_fail "a trivial 'sbatch --wait' job exited with $rc"
say "srun and sbatch work"

# ---------------------------------------------------------------- the ftune job
"$FTUNE" init-model --output "$WORK/model" --hidden_size 32 --num_hidden_layers 1 --vocab_size 64 \
  --intermediate_size 48 --num_attention_heads 2 --num_key_value_heads 1 >"$WORK/log/init-model.out" 2>&1 ||
  fail "ftune init-model failed: $(cat "$WORK/log/init-model.out")"
mkdir -p "$WORK/data/train"
for i in $(seq 0 15); do
  echo "{\"input_ids\": [1, $((3 + i)), $((20 + i % 7)), $((30 + (i * 5) % 31)), $((4 + (i * 11) % 59)), 2]}"
done >"$WORK/data/train/train.jsonl"
CONFIG="$WORK/tiny.toml"
cat >"$CONFIG" <<EOF
# tests/test_slurm.sh: 3 steps of LoRA on a tiny random Llama
model_name_or_path = "$WORK/model"
train_file_dir = ["$WORK/data/train"]
output_dir = "$WORK/out-from-config"   # the job passes --output_dir, which must win
overwrite_output_dir = true
max_steps = 3
per_device_train_batch_size = 1
gradient_accumulation_steps = 1
logging_steps = 1
learning_rate = 1e-3
EOF

if [ "$WORLD_MODE" = auto ]; then
  if grep -aq SLURM_PROCID "$FTUNE"; then WORLD_MODE=2; else WORLD_MODE=off; fi
fi

# submit NAME MASTER_PORT SRUN_ARGS FTUNE_CMD [ARGS...]: submits the sbatch script (2 tasks,
# -c 1) with `sbatch --wait`, shows the job's output and checks that it completed. Sets LOG.
submit() {
  local name=$1 port=$2 srun_args=$3 cmd=$4 rc jobid info jstate jexit
  shift 4
  say "[$name] submitting $SCRIPT: ftune $cmd, 2 tasks, rendezvous port $port${srun_args:+, SRUN_ARGS=$srun_args}"
  env FTUNE_SLURM_TEST_TAG="$TAG" FTUNE="$FTUNE" CONFIG="$CONFIG" FTUNE_CMD="$cmd" MASTER_PORT="$port" \
    SRUN_ARGS="$srun_args" timeout 90 sbatch --wait --parsable -N 1 -n 2 --ntasks-per-node=2 -c 1 -t 5 \
    -J "ftune-$name" -D "$WORK/job" -o "$WORK/job/ftune-%j.out" "$SCRIPT" "$@" \
    >"$WORK/log/sbatch-$name.out" 2>&1
  rc=$?
  jobid=$(grep -oE '^[0-9]+' "$WORK/log/sbatch-$name.out" | head -n 1)
  LOG="$WORK/job/ftune-${jobid:-none}.out"
  echo "---- [$name] job ${jobid:-?} output ($LOG)"
  sed 's/^/  /' "$LOG" 2>/dev/null
  echo "----"
  [ -n "$jobid" ] || fail "[$name] sbatch did not submit the job: $(cat "$WORK/log/sbatch-$name.out")"
  [ $rc != 124 ] || fail "[$name] the job did not finish within 90 s"
  info=$(timeout 5 scontrol show job -o "$jobid" 2>/dev/null)
  jstate=$(echo "$info" | grep -oE 'JobState=[A-Z_]+' | cut -d= -f2)
  jexit=$(echo "$info" | grep -oE ' ExitCode=[0-9]+:[0-9]+' | cut -d= -f2)
  say "[$name] job $jobid: sbatch --wait exit $rc, JobState=${jstate:-?} ExitCode=${jexit:-?}"
  [ $rc = 0 ] || fail "[$name] the job exited with status $rc (see the output above and $WORK/log/slurmd.log)"
  [ "${jstate:-COMPLETED}" = COMPLETED ] || fail "[$name] job state $jstate, expected COMPLETED"
  [ "${jexit:-0:0}" = 0:0 ] || fail "[$name] job exit code $jexit, expected 0:0"
}

# run_job NAME OUT_DIR MASTER_PORT [SRUN_ARGS]: `ftune train` with --output_dir OUT_DIR --seed 7,
# then checks the outputs (and the world, when that check is on).
run_job() {
  local name=$1 out=$2 port=$3 srun_args=${4:-} steps n2
  submit "$name" "$port" "$srun_args" train --output_dir "$out" --seed 7

  # Outputs: written to --output_dir (the extra argument reached ftune), not the config's.
  [ -f "$out/adapter/adapter_model.safetensors" ] || fail "[$name] $out/adapter/adapter_model.safetensors missing"
  [ -f "$out/adapter/adapter_config.json" ] || fail "[$name] $out/adapter/adapter_config.json missing"
  [ -f "$out/metrics.jsonl" ] || fail "[$name] $out/metrics.jsonl missing"
  [ ! -e "$WORK/out-from-config" ] || fail "[$name] the config's output_dir was used: --output_dir did not reach ftune"
  grep -qE '^seed *= *7$' "$out/ftune_config.toml" 2>/dev/null ||
    fail "[$name] --seed 7 did not reach ftune ($out/ftune_config.toml)"
  grep -qE '"step"[[:space:]]*:[[:space:]]*3[,}]' "$out/metrics.jsonl" || fail "[$name] metrics.jsonl has no step 3"
  steps=$(grep -cE '"loss"[[:space:]]*:' "$out/metrics.jsonl")
  if [ "$WORLD_MODE" = 2 ]; then
    n2=$(grep -c '\[ftune\] world: 2 ranks' "$LOG")
    [ "$n2" = 1 ] || fail "[$name] expected one '[ftune] world: 2 ranks' line in the job log, found $n2" \
      "(the 2 srun tasks did not form one world: check SLURM_PROCID/SLURM_NTASKS/MASTER_ADDR handling)"
    ! grep -q '\[ftune\] world: 1 rank' "$LOG" || fail "[$name] a task ran as a world of 1 rank under srun -n 2"
    [ "$steps" = 3 ] || fail "[$name] metrics.jsonl has $steps training lines, expected 3 (rank 0 alone writes metrics)"
    say "[$name] ok: $(grep -m1 '\[ftune\] world:' "$LOG" | cut -c1-60); adapter + metrics ($steps steps) in $out"
  else
    [ "$steps" -ge 3 ] || fail "[$name] metrics.jsonl has $steps training lines, expected at least 3"
    say "[$name] ok: 2 tasks, adapter + metrics in $out"
  fi
}

run_job tcp "$WORK/out" "$RDV_PORT"

# `ftune doctor` through the same script (FTUNE_CMD=doctor), once the binary has it.
if "$FTUNE" doctor --help >/dev/null 2>&1; then
  submit doctor "$(pick_port "$CTLD_PORT" "$SLURMD_PORT" "$RDV_PORT")" "" doctor \
    --output_dir "$WORK/out-doctor" --allreduce_mib 1
  expect=1; [ "$WORLD_MODE" = 2 ] && expect=2
  grep -q "doctor: all checks passed on $expect rank" "$LOG" ||
    fail "[doctor] expected 'doctor: all checks passed on $expect rank(s)' in the job log"
  say "[doctor] ok: all checks passed on $expect rank(s)"
else
  say "[doctor] skipped: $FTUNE has no doctor command yet"
fi

# The same job through MPI (srun --mpi=pmix, an MPI-enabled ftune): FTUNE_TEST_SLURM_MPI=auto
# (default: when the world check is on, ftune links libmpi and this Slurm offers pmix), 1, 0.
MPI_MODE="${FTUNE_TEST_SLURM_MPI:-auto}"
has_pmix=0
timeout 10 srun --mpi=list 2>&1 | grep -qw pmix && has_pmix=1
if [ "$MPI_MODE" = auto ]; then
  MPI_MODE=0
  [ "$WORLD_MODE" = 2 ] && [ "$has_pmix" = 1 ] && ldd "$FTUNE" 2>/dev/null | grep -q libmpi && MPI_MODE=1
fi
if [ "$MPI_MODE" = 1 ]; then
  [ "$has_pmix" = 1 ] || fail "FTUNE_TEST_SLURM_MPI=1 but this Slurm has no pmix plugin (srun --mpi=list)"
  run_job mpi "$WORK/out-mpi" "$(pick_port "$CTLD_PORT" "$SLURMD_PORT" "$RDV_PORT")" "--mpi=pmix"
fi

if [ "$WORLD_MODE" = 2 ]; then
  say "PASS: ftune under Slurm formed one 2-rank world (TCP launcher$([ "$MPI_MODE" = 1 ] && echo ', and MPI via srun --mpi=pmix'))"
else
  echo "NOTE: world check not enabled: $FTUNE does not read SLURM_PROCID yet, so each srun task" \
       "trained as its own single rank (FTUNE_TEST_SLURM_WORLD=2 requires one 2-rank world)"
  say "PASS: ftune job under Slurm (2 tasks, each its own rank)"
fi
exit 0
