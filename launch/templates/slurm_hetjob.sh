#!/bin/bash
# {{header}}
# One heterogeneous Slurm job: component 0 = trainer nodes (srun + torchrun, rendezvous on the first trainer node),
# component 1 = engine nodes (one engine server per GPU group, each registers its address in the run directory).
# Rendered by `oapl-launch slurm`; keep and edit it freely. Logs: {{log_root}}/attempt-N (N = SLURM_RESTART_COUNT).
#SBATCH --job-name={{job_name}}
#SBATCH --output={{log_root}}/job-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@{{signal_grace_s}}
#SBATCH {{requeue}}
{{sbatch_trainer}}
#SBATCH hetjob
{{sbatch_engines}}

set -uo pipefail
WORKDIR={{workdir}}
RUN_DIR={{run_dir}}
LOG_ROOT={{log_root}}
PY={{python}}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
LOG="$LOG_ROOT/attempt-$ATTEMPT"
mkdir -p "$LOG" "$RUN_DIR"
cd "$WORKDIR"
say() { echo "[oapl-launch $(date +%H:%M:%S)] $*" | tee -a "$LOG/batch.log"; }

# The config this job runs (resolved when the script was rendered; edit here or re-render).
cat >"$LOG/config.yaml" <<'OAPL_CONFIG_EOF'
{{config_yaml}}
OAPL_CONFIG_EOF

{{setup}}
export PYTHONPATH={{pythonpath}}${PYTHONPATH:+:$PYTHONPATH}
# Every process of this run carries these: the next attempt's cleanup finds leftovers by them (and nothing else).
export OAPL_RUN_TAG="$RUN_DIR" OAPL_ATTEMPT_TAG="$SLURM_JOB_ID.$ATTEMPT"
{{env}}
# Control-plane key shared by the trainer and the engine servers of this attempt (never on a command line).
export OAPL_ENGINE_AUTHKEY=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
RDZV_PORT=$(( {{rdzv_port}} + SLURM_JOB_ID % 1000 ))
# Since Slurm 22.05 srun does not inherit --cpus-per-task: give each step the CPUs its component holds per node
# (torchrun and its ranks share the trainer node's; each engine server gets its share of an engine node's).
cpus_of() { local v="${1%%(*}"; echo "${v%%,*}"; }   # "64(x2)" → 64
TRAINER_CPUS=$(cpus_of "$SLURM_JOB_CPUS_PER_NODE_HET_GROUP_0")
ENGINE_CPUS=$(( $(cpus_of "$SLURM_JOB_CPUS_PER_NODE_HET_GROUP_1") / {{engines_per_node}} ))
(( ENGINE_CPUS >= 1 )) || ENGINE_CPUS=1
say "job $SLURM_JOB_ID attempt $ATTEMPT: trainer nodes $SLURM_JOB_NODELIST_HET_GROUP_0 (head $HEAD_ADDR:$RDZV_PORT)," \
    "engine nodes $SLURM_JOB_NODELIST_HET_GROUP_1"
say "{{placement}}"

# Every step of this job on every node: srun with the container flags (if any), fail fast on any task's failure.
# setsid: srun answers SIGTERM by killing its step ("forcing job termination"); in a session of its own it is out of
# reach of a SIGTERM meant for this shell (`scancel --full --signal=TERM` signals the shell's process group), so the
# trap below can ask the trainer for a checkpoint instead. `kill $PID` of an srun still stops its step.
STEP=(setsid -w srun --kill-on-bad-exit=1 {{srun_container}})
RUNPY=({{run_prefix}} "$PY")

# Preemption (--signal=B:TERM@N, scancel -b/--full --signal=TERM): the trainer checkpoints at its next sync point
# and exits; then this job requeues itself and the next attempt resumes.
rm -rf "$RUN_DIR/engines/registry" "$RUN_DIR/PREEMPT" "$RUN_DIR/preempted.json"
PREEMPTED=0
on_term() {
    PREEMPTED=1
    say "preemption signal: the trainer checkpoints at its next sync point, then the job requeues"
    date +%s >"$RUN_DIR/PREEMPT"
}
trap on_term TERM

# 1. Before anything starts: processes left by earlier attempts of this run and stale /dev/shm segments.
"${STEP[@]}" --het-group=0,1 --ntasks-per-node=1 --output="$LOG/cleanup-node%t.log" \
    "${RUNPY[@]}" -m oapl_megatron.launch.node_cleanup \
    || say "warning: cleanup failed on some node (see $LOG/cleanup-*.log)"

# 2. Pre-flight: a GEMM on every device and a collective over all nodes; slow or failing nodes are named.
if {{preflight}}; then
    if ! "${STEP[@]}" --het-group=0,1 --ntasks-per-node=1 {{step_gpus}} --output="$LOG/preflight-node%t.log" \
        "${RUNPY[@]}" -m oapl_megatron.launch.preflight --master "$HEAD_ADDR:$((RDZV_PORT + 1))" \
        --out "$LOG/preflight" --slow-ratio {{preflight_slow_ratio}} {{preflight_fail_slow}}; then
        say "ERROR: pre-flight failed: $(cat "$LOG/preflight/summary.txt" 2>/dev/null || echo 'see preflight logs')"
        exit 1
    fi
    say "pre-flight: $(cat "$LOG/preflight/summary.txt")"
fi

# 3. Engines (component 1): one engine server per GPU group; each registers host:port in $RUN_DIR/engines/registry.
"${STEP[@]}" --het-group=1 --nodes={{engine_nodes}} --ntasks-per-node={{engines_per_node}} \
    --cpus-per-task="$ENGINE_CPUS" {{step_gpus}} \
    --output="$LOG/engine-%t.log" \
    "${RUNPY[@]}" -m oapl_megatron.entrypoints.engine_server --config "$LOG/config.yaml" \
    --register-dir "$RUN_DIR/engines/registry" &
ENGINES=$!

# 4. Trainer (component 0): torchrun on every trainer node, rendezvous at the first one; resumes after a requeue.
RESUME=()
[[ $ATTEMPT -gt 0 ]] && RESUME=(--resume)
"${STEP[@]}" --het-group=0 --nodes={{trainer_nodes}} --ntasks-per-node=1 --cpus-per-task="$TRAINER_CPUS" \
    {{step_gpus}} \
    --output="$LOG/trainer-node%t.log" \
    "${RUNPY[@]}" -m torch.distributed.run --nnodes={{trainer_nodes}} --nproc-per-node={{trainer_ranks_per_node}} \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$RDZV_PORT" --rdzv-id="oapl_$SLURM_JOB_ID" --max-restarts=0 \
    -m oapl_megatron.entrypoints.train "$LOG/config.yaml" weight_sync.host="$HEAD_ADDR" "${RESUME[@]}" &
TRAINER=$!

stop_step() {  # stop_step PID NAME [GRACE_S]: let the step end by itself ≤ GRACE_S, then SIGTERM its srun (which
    # kills the step's tasks), bounded wait
    for _ in $(seq $(( ${3:-0} * 2 ))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
    kill -0 "$1" 2>/dev/null || return 0
    say "stopping the $2"
    kill -TERM "$1" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$1" 2>/dev/null
}

# Fail fast both ways: whichever component ends first decides. A loop around `wait` because a signal (the
# SIGCONT before SIGTERM) ends a bare wait early; the trap must still run.
TRAINER_RC=""
ENGINES_RC=""
while [[ -z $TRAINER_RC ]]; do
    if ! kill -0 "$TRAINER" 2>/dev/null; then wait "$TRAINER"; TRAINER_RC=$?; break; fi
    if [[ -z $ENGINES_RC ]] && ! kill -0 "$ENGINES" 2>/dev/null; then
        wait "$ENGINES"; ENGINES_RC=$?
        if [[ $ENGINES_RC -ne 0 ]]; then
            say "ERROR: the engine component (het group 1, engine servers 0-$(( {{engines}} - 1 )) on" \
                "$SLURM_JOB_NODELIST_HET_GROUP_1) ended with exit code $ENGINES_RC while the trainer was running;" \
                "stopping the trainer. Engine logs: $LOG/engine-*.log"
            for f in "$LOG"/engine-*.log; do say "--- last lines of $f"; tail -n 5 "$f" | tee -a "$LOG/batch.log"; done
            stop_step "$TRAINER" "trainer"
            wait "$TRAINER" 2>/dev/null
            exit 1
        fi
    fi
    sleep 1 & wait $! 2>/dev/null
done
stop_step "$ENGINES" "engine servers" 30   # normally they leave by themselves when the trainer disconnects
wait "$ENGINES" 2>/dev/null

if [[ $PREEMPTED -eq 1 ]]; then
    if [[ -f "$RUN_DIR/preempted.json" ]]; then
        say "trainer checkpointed after the preemption signal: $(cat "$RUN_DIR/preempted.json")"
    else
        say "trainer ended (code $TRAINER_RC) without a preemption checkpoint; the next attempt resumes from the" \
            "newest complete checkpoint"
    fi
    if [[ "{{requeue_on}}" == 1 && $ATTEMPT -lt {{max_restarts}} ]]; then
        say "requeueing job $SLURM_JOB_ID (attempt $((ATTEMPT + 1)) resumes with --resume)"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    say "not requeueing (requeue off or {{max_restarts}} attempts made)"
    exit 1
fi
if [[ $TRAINER_RC -ne 0 ]]; then
    say "ERROR: the trainer (het group 0) failed with exit code $TRAINER_RC; logs: $LOG/trainer-*.log"
    for f in "$LOG"/trainer-*.log; do say "--- last lines of $f"; tail -n 15 "$f" | tee -a "$LOG/batch.log"; done
    exit "$TRAINER_RC"
fi
say "training finished"
