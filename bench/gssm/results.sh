#!/usr/bin/env bash
# Train the study's presets side by side on one GPU, probe each, and print the results table
# (docs/results/gssm.md). Usage: bench/gssm/results.sh [PRESET...] -- [override ...]
# e.g. bench/gssm/results.sh sparse dense -- train.steps=8000. Runs go to $LATENTFORGE_RUNS (default runs/).
set -euo pipefail
RUNS=${LATENTFORGE_RUNS:-runs}
LF=${LATENTFORGE:-"python3 -m latentforge"}
presets=()
while [[ $# -gt 0 && $1 != "--" ]]; do presets+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
[[ ${#presets[@]} -eq 0 ]] && presets=(base sparse dense low_entropy)
mkdir -p "$RUNS"
for preset in "${presets[@]}"; do
  $LF train "gssm/$preset" "$@" --name "gssm-$preset" --runs-dir "$RUNS" --overwrite --quiet \
    > "$RUNS/gssm-$preset.log" 2>&1 &
done
wait
for preset in "${presets[@]}"; do
  $LF probe "gssm-$preset" --runs-dir "$RUNS" --json > "$RUNS/gssm-$preset/artifacts/probe.json"
done
python3 -m bench.gssm.summary "$RUNS" "${presets[@]}"
