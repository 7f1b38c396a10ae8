#!/bin/bash
# Train the runs of a spec file side by side on one GPU, then evaluate each on the public test set
# and compare them. A spec line is `NAME PRESET [key=value ...]`; a run that already exists is
# resumed instead. Every run stops after LIMIT seconds at the latest (SIGTERM: it checkpoints).
#
#   bash bench/multiply/side_by_side.sh bench/multiply/icot.txt 505
#
# $LATENTFORGE_RUNS is where the runs go (default ./runs); $SPLIT the split evaluated and
# compared (default icot_test).
# The numbers in docs/results/multiply.md come from this script and the spec files next to it.
set -u
SPEC=$1
LIMIT=${2:-480}
RUNS=${LATENTFORGE_RUNS:-runs}
SPLIT=${SPLIT:-icot_test}
mkdir -p "$RUNS/logs"
names=()
while read -r name preset rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  names+=("$name")
  if [ -f "$RUNS/$name/run.json" ]; then
    timeout -s TERM "$LIMIT" python3 -m latentforge resume "$name" -q --runs-dir "$RUNS" > "$RUNS/logs/$name.log" 2>&1 &
  else
    # shellcheck disable=SC2086
    timeout -s TERM "$LIMIT" python3 -m latentforge train "$preset" $rest --name "$name" -q --runs-dir "$RUNS" \
      > "$RUNS/logs/$name.log" 2>&1 &
  fi
done < "$SPEC"
wait
for name in "${names[@]}"; do
  python3 -m latentforge eval "$name" --split "$SPLIT" -q --runs-dir "$RUNS" > "$RUNS/logs/$name.eval.log" 2>&1 &
done
wait
python3 -m latentforge compare "${names[@]}" --split "$SPLIT" --runs-dir "$RUNS" --out "$RUNS/compare"
