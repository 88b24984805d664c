#!/usr/bin/env bash
# One rank of a DeepSpeed job under srun (one task per GPU): export what torch.distributed
# and DeepSpeed read, then run the command given (normally `python launch/unlearn.py ...`).
#
#     srun launch/slurm/srun_rank.sh python launch/unlearn.py --deepspeed ds_configs/zero3.json
#
# DeepSpeed reads no Slurm variables (without these it falls back to MPI discovery), so:
#     RANK=$SLURM_PROCID  WORLD_SIZE=$SLURM_NTASKS  LOCAL_RANK=$SLURM_LOCALID
#     LOCAL_SIZE=LOCAL_WORLD_SIZE=<tasks of this step on this node>  NODE_RANK=$SLURM_NODEID
#     MASTER_ADDR=$NGDIFF_MASTER_ADDR, else the first host of the step's node list (rank 0's)
#     MASTER_PORT=$NGDIFF_MASTER_PORT, else 10000 + job id % 20000 (below Linux's ephemeral
#                 range; the same on every rank and on every requeue of the job)
#
# Preemption (set by launch/slurm/unlearn.sbatch, absent in plain use): with
# NGDIFF_PREEMPT_MARKER=<file>, a command exit code of 75 ("preempted, checkpoint written")
# becomes 0 for srun, and rank 0 creates <file>. srun runs with --kill-on-bad-exit, which
# would otherwise kill the ranks still exiting and report 143 instead of 75. The command
# still gets SIGTERM/SIGUSR1 itself: Slurm signals every process of the task, and this
# shell's trap only keeps it alive until the command has exited.
# Without NGDIFF_PREEMPT_MARKER the command replaces this shell (exec): exit codes unchanged.
set -euo pipefail

if [[ -z ${SLURM_PROCID:-} || -z ${SLURM_JOB_ID:-} ]]; then
    echo "srun_rank.sh: run me under srun (SLURM_PROCID/SLURM_JOB_ID are not set)" >&2
    exit 2
fi
if [[ $# -eq 0 ]]; then
    echo "srun_rank.sh: no command given" >&2
    exit 2
fi

# "2(x3),1" -> the count of the node at index $2
tasks_on_node() {
    local item index=0 IFS=,
    for item in $1; do
        local count=$item repeat=1
        if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count=${BASH_REMATCH[1]}
            repeat=${BASH_REMATCH[2]}
        fi
        if (( $2 < index + repeat )); then
            echo "$count"
            return 0
        fi
        index=$(( index + repeat ))
    done
    return 1
}

hostnames() {  # a Slurm node list, one host a line
    scontrol show hostnames "$1" || { echo "srun_rank.sh: scontrol cannot expand $1" >&2; exit 2; }
}

step_nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
tasks_per_node=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}
if [[ $tasks_per_node =~ ^([0-9]+)(\(x[0-9]+\))?$ ]]; then  # the same on every node
    local_size=${BASH_REMATCH[1]}
else
    node_index=${SLURM_NODEID:-0}
    if [[ -n $step_nodes && -n ${SLURMD_NODENAME:-} ]]; then  # the step may skip job nodes
        position=$(hostnames "$step_nodes" | grep -nxF -- "$SLURMD_NODENAME" | cut -d: -f1 || true)
        [[ -n $position ]] && node_index=$(( position - 1 ))
    fi
    local_size=$(tasks_on_node "$tasks_per_node" "$node_index" \
                 || echo "${SLURM_NTASKS_PER_NODE:-1}")
fi

export RANK=$SLURM_PROCID
export WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}
export LOCAL_RANK=${SLURM_LOCALID:-0}
export LOCAL_SIZE=$local_size
export LOCAL_WORLD_SIZE=$local_size
export NODE_RANK=${SLURM_NODEID:-0}
if [[ -n ${NGDIFF_MASTER_ADDR:-} ]]; then
    export MASTER_ADDR=$NGDIFF_MASTER_ADDR
else
    MASTER_ADDR=$(hostnames "$step_nodes" | head -n 1)
    export MASTER_ADDR
fi
export MASTER_PORT=${NGDIFF_MASTER_PORT:-$(( 10000 + SLURM_JOB_ID % 20000 ))}

if [[ -z ${NGDIFF_PREEMPT_MARKER:-} ]]; then
    exec "$@"
fi

# A trap (not an ignore, which the command would inherit): Slurm's signal also reaches this
# shell, whose default action would end the task before the command has checkpointed.
trap ':' TERM USR1
status=0
"$@" || status=$?
if (( status == 75 )); then
    if (( RANK == 0 )); then
        : > "$NGDIFF_PREEMPT_MARKER"
    fi
    exit 0
fi
exit "$status"
