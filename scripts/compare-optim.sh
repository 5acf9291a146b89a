#!/usr/bin/env bash
# Trains the 12 specs of specs/compare-optim/ (AdamW, schedule-free AdamW, Shampoo, Muon, each with
# expert_lr = lr, 0.1 x lr and adaptive) one after another and writes the comparison report (table,
# loss and balance plots, router-logit bands) to $OUT/report. The table of
# specs/compare-optim/README.md is that report's table.
# Usage: scripts/compare-optim.sh [MOEC binary, default target/debug/moec] [OUT, default runs/compare-optim]
#        [SPECS folder, default specs/compare-optim; specs/compare-optim/shakespeare: the same model on
#        tiny shakespeare with AdamW, Shampoo and Muon]
set -euo pipefail
moec=${1:-target/debug/moec}
out=${2:-runs/compare-optim}
specs=${3:-specs/compare-optim}
mkdir -p "$out"
for spec in "$specs"/*.moe; do
  name=$(basename "$spec" .moe)
  start=$(date +%s)
  if ! "$moec" train "$spec" --out "$out/$name" > "$out/$name.log" 2>&1; then
    tail -20 "$out/$name.log"
    exit 1
  fi
  echo "$name: $(( $(date +%s) - start )) s, $(grep -o 'final: .*' "$out/$name.log" | head -1)"
done
"$moec" report "$out"/*/ --out "$out/report"
