# ---- maescale job preamble (infra/slurm/preamble.sh) ------------------------------
{{setup}}
set -u  # after the setup lines: `module load` and some activate scripts read unset variables
# Rendezvous on the job's first node; each srun task maps SLURM_PROCID/LOCALID/...
# to RANK/LOCAL_RANK/WORLD_SIZE itself (infra/slurm/env.py): no ssh, no hostfile.
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
echo "maescale: job $SLURM_JOB_ID ($SLURM_JOB_NAME) attempt $attempt on $SLURM_JOB_NODELIST," \
     "$SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"

# {{grace_s}} s before the time limit Slurm sends USR1 to this script (--signal=B:USR1@...):
# every task gets TERM, saves a checkpoint at the end of its step and exits; then the
# job is requeued and resumes from that checkpoint.
requeue_asked=0
on_time_limit() {
  echo "maescale: time limit in {{grace_s}} s: every task checkpoints and exits, then the job is requeued"
  requeue_asked=1
  scancel --signal=TERM "$SLURM_JOB_ID"  # the job's steps, not this script
}
trap on_time_limit USR1

# Wait for the step started in the background (a trapped signal interrupts `wait`).
wait_for_step() {
  step_pid=$!
  while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
  wait "$step_pid"
  step_rc=$?
  echo "maescale: step exited with $step_rc, $(date -u +%FT%TZ)"
}

requeue() {
  if [ "${SLURM_RESTART_COUNT:-0}" -ge {{max_requeues}} ]; then
    echo "maescale: not requeueing ($1): the job was already requeued {{max_requeues}} times"
    exit 1
  fi
  echo "maescale: requeueing job $SLURM_JOB_ID ($1); the next attempt resumes from the last checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "maescale: scontrol requeue failed: resubmit this script to resume from the last checkpoint"
    exit 1
  fi
  exit 0
}

# run_summary.json's modification time in ns (0: none yet), taken before the step: a
# summary left by an earlier attempt is not this step's.
summary_stamp() {
  "$1" -c 'import os, sys; print(os.stat(sys.argv[1]).st_mtime_ns if os.path.exists(sys.argv[1]) else 0)' "$2" 2>/dev/null || echo 0
}

# Requeue when the training step stopped early on a signal its tasks got while this
# script did not (a preemption notice, `scancel --signal=TERM`): the trainer saved,
# wrote a run_summary.json that says stopped_by_signal, and exited with 128 + the signal.
requeue_if_stopped() {
  if [ "$step_rc" -ne 0 ] && "$1" -c 'import json, os, sys; sys.exit(0 if os.stat(sys.argv[1]).st_mtime_ns != int(sys.argv[2]) and json.load(open(sys.argv[1])).get("stopped_by_signal") else 1)' "$2" "$3" 2>/dev/null; then
    requeue "stopped by a signal before the last step"
  fi
}
# ---- end of preamble -----------------------------------------------------------------
