# psr's Slurm environment: sourced by slurm/*.sbatch inside a job, and by slurm/submit.sh before sbatch.
# Nothing site-specific lives in the scripts: set these in your shell or in the git-ignored
# conf/local/slurm.env (sourced here when present; see docs/cluster.md):
#
#   PSR_ROOT           the psr checkout (default: the directory above this file; jobs find it through
#                      $SLURM_SUBMIT_DIR, so submit from the checkout or export PSR_ROOT)
#   PSR_VENV           virtual environment to activate in the job (default: $PSR_ROOT/.venv; "none": use PATH)
#   PSR_RUN_ROOT       where run directories and job logs go (default: $PSR_ROOT/runs/slurm)
#   PSR_RUN_DIR        one job's run directory (default: $PSR_RUN_ROOT/<job name>-<job id>: a requeued job
#                      keeps its id, so it finds its checkpoints again)
#   PSR_DEVICE         gpu (default) | cpu: CUDA hidden, the torch engine falls back to CPU + gloo
#   PSR_MASTER_PORT    rendezvous port of multi-node jobs (default: 20000 + job id % 40000)
# Submission only (slurm/submit.sh turns them into sbatch options; the submitit launcher reads them too):
#   PSR_PARTITION PSR_ACCOUNT PSR_QOS  partition, account, QOS
#   PSR_TIME_MIN       time limit in minutes
#   PSR_GPUS_PER_NODE  GPUs per node; one task per GPU (--gpus-per-node and --ntasks-per-node)
#   PSR_CPUS_PER_TASK  CPU cores per task (also OMP_NUM_THREADS in the job)
#   PSR_MEM_GB         memory per node in GB
#   PSR_SBATCH_ARGS    any other sbatch options, space-separated (e.g. "--constraint=h100 --exclusive")

if [ -z "${PSR_ROOT:-}" ]; then
  if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/slurm/env.sh" ]; then
    PSR_ROOT=$SLURM_SUBMIT_DIR
  else
    PSR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
fi
export PSR_ROOT
if [ -f "$PSR_ROOT/conf/local/slurm.env" ]; then
  # shellcheck disable=SC1091
  source "$PSR_ROOT/conf/local/slurm.env"
fi
export PSR_VENV=${PSR_VENV:-$PSR_ROOT/.venv}
export PSR_RUN_ROOT=${PSR_RUN_ROOT:-$PSR_ROOT/runs/slurm}
export PSR_DEVICE=${PSR_DEVICE:-gpu}

# sbatch options from the PSR_* submission settings, one per line (slurm/submit.sh reads them).
psr_sbatch_options() {
  [ -n "${PSR_PARTITION:-}" ] && echo "--partition=$PSR_PARTITION"
  [ -n "${PSR_ACCOUNT:-}" ] && echo "--account=$PSR_ACCOUNT"
  [ -n "${PSR_QOS:-}" ] && echo "--qos=$PSR_QOS"
  [ -n "${PSR_TIME_MIN:-}" ] && echo "--time=$PSR_TIME_MIN"
  if [ -n "${PSR_GPUS_PER_NODE:-}" ] && [ "$PSR_DEVICE" != cpu ]; then
    echo "--gpus-per-node=$PSR_GPUS_PER_NODE"
    echo "--ntasks-per-node=$PSR_GPUS_PER_NODE"
  fi
  [ -n "${PSR_CPUS_PER_TASK:-}" ] && echo "--cpus-per-task=$PSR_CPUS_PER_TASK"
  [ -n "${PSR_MEM_GB:-}" ] && echo "--mem=${PSR_MEM_GB}G"
  echo "--output=$PSR_RUN_ROOT/logs/%x-%j.out"
  local arg
  for arg in ${PSR_SBATCH_ARGS:-}; do echo "$arg"; done
  return 0
}

# In the job: the virtual environment, threads, the device, and the rendezvous of a multi-task step.
psr_job_setup() {
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "psr: $0 is an sbatch script: submit it with sbatch (or slurm/submit.sh), not bash" >&2
    exit 2
  fi
  if [ "$PSR_VENV" != none ]; then
    if [ ! -f "$PSR_VENV/bin/activate" ]; then
      echo "psr: PSR_VENV=$PSR_VENV has no bin/activate (set PSR_VENV in conf/local/slurm.env)" >&2
      exit 2
    fi
    # shellcheck disable=SC1091
    source "$PSR_VENV/bin/activate"
  fi
  cd "$PSR_ROOT" || exit 2
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}
  export WANDB_MODE=${WANDB_MODE:-offline}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  if [ "$PSR_DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=""  # the torch engine then picks the CPU and gloo (engine.device/backend: null)
  fi
  # the first node of the allocation hosts the rendezvous; a port from the job id, so concurrent jobs
  # differ and a requeued job (same id) reuses its own
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
  export MASTER_PORT=${PSR_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
  echo "psr: job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}:" \
    "${SLURM_NTASKS:-1} tasks, device ${PSR_DEVICE}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, $(date -Is)"
}

# srun the command as one task per GPU (the allocation's tasks), each with torch's rank variables,
# exec'ing it so that signals reach the Python process itself: `#SBATCH --signal=USR1@120` (before the
# time limit) and Slurm's SIGTERM (preemption, scontrol requeue) go to every task of the step; the
# trainers then save a checkpoint, rank 0 requeues the job (config key requeue_on_preemption), and the
# requeued job resumes with resume=auto in the same run directory.
psr_srun() {
  srun --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' psr "$@"
}
