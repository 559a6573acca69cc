#!/usr/bin/env bash
# The embedded tiny default end to end on CPU: psr-data -> psr-sft -> psr-rl -> psr-eval.
#   bash scripts/quickstart.sh [OUT]        (OUT defaults to runs/quickstart; `make demo` runs this)
# Each stage reads what the previous one wrote; rerunning resumes (finished shards and checkpoints
# are kept), so delete OUT to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/quickstart}")
BIN=${PSR_BIN:-.venv/bin}
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

echo "== 1/4 psr-data: synthetic multi-subject records -> $OUT/data"
"$BIN/psr-data" experiment=quickstart out_dir="$OUT/data" hydra.run.dir="$OUT/data/.hydra_run"
MANIFEST="$OUT/data/export/manifest.jsonl"

echo "== 2/4 psr-sft: multi-reference SFT of tiny FLUX Kontext -> $OUT/sft"
"$BIN/psr-sft" experiment=quickstart data.manifest="$MANIFEST" hydra.run.dir="$OUT/sft"

echo "== 3/4 psr-rl: GRPO from the SFT model with the colour reward -> $OUT/rl"
"$BIN/psr-rl" experiment=quickstart data=manifest data.manifest="$MANIFEST" data.heldout=2 \
  init_from="$OUT/sft" hydra.run.dir="$OUT/rl"

echo "== 4/4 psr-eval: the RL model on the held-out records -> $OUT/eval"
"$BIN/psr-eval" experiment=quickstart data=manifest data.manifest="$MANIFEST" data.heldout=2 \
  eval.split=heldout checkpoint="$OUT/rl" hydra.run.dir="$OUT/eval"

echo "== report: the evaluation next to the paper's table, and the SFT / RL reward curves -> $OUT/report"
"$BIN/psr-report" "$OUT/eval" "$OUT/sft" "$OUT/rl" --out "$OUT/report"

cat <<MSG

quickstart done in $(( $(date +%s) - start )) s. Outputs:
  data      $MANIFEST  (report: $OUT/data/report)
  SFT       $OUT/sft/checkpoints  metrics: $OUT/sft/metrics.jsonl  grids: $OUT/sft/images
  RL        $OUT/rl/checkpoints   metrics: $OUT/rl/metrics.jsonl   grids: $OUT/rl/images
  eval      $OUT/eval/summary.json  samples: $OUT/eval/samples
  report    $OUT/report/report.md  (table, charts, contact sheets, curves)
MSG
