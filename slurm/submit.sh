#!/bin/bash
# sbatch with this site's settings (PSR_PARTITION, PSR_ACCOUNT, PSR_TIME_MIN, PSR_GPUS_PER_NODE, ... from the
# environment or conf/local/slurm.env; see slurm/env.sh) put before your own options, which win.
# Used by: bash slurm/submit.sh [sbatch options] slurm/rl.sbatch [Hydra overrides]
#          bash slurm/submit.sh --array=0-63 slurm/data_array.sbatch plan.num_records=350000 ...
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p "$PSR_RUN_ROOT/logs"
mapfile -t site < <(psr_sbatch_options)
cd "$PSR_ROOT"
echo "+ sbatch ${site[*]} $*" >&2
exec sbatch "${site[@]}" "$@"
