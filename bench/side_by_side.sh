#!/bin/bash
# Train the runs of a spec file side by side on one GPU, then evaluate each on one split and
# report them. A spec line is `NAME PRESET [key=value ...]`; a run that already exists is
# resumed instead. Every run stops after LIMIT seconds at the latest (SIGTERM: it checkpoints).
#
#   bash bench/side_by_side.sh bench/multiply/icot.txt 505
#   SPLIT=test REPORT="python3 -m bench.dvae.summary" bash bench/side_by_side.sh bench/dvae/codebooks.txt 480
#
# $LATENTFORGE_RUNS is where the runs go (default ./runs); $SPLIT the split evaluated (default
# icot_test); $REPORT the command given the runs directory and the run names at the end (default:
# `latentforge compare` of the runs on $SPLIT).
# The numbers in docs/results/multiply.md and dvae.md come from this script and the spec files.
set -u
SPEC=$1
LIMIT=${2:-480}
RUNS=${LATENTFORGE_RUNS:-runs}
SPLIT=${SPLIT:-icot_test}
mkdir -p "$RUNS/logs"
# The runs share the host's cores: each gets its share of CPU threads (torch's default is one per core each, and
# several CPU-heavy steps at once, such as fitting a context before training, then starve each other) unless
# OMP_NUM_THREADS is set.
runs=$(grep -cv '^[[:space:]]*\(#\|$\)' "$SPEC")
per_run=$(( $(nproc) / (runs > 0 ? runs : 1) ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( per_run > 0 ? per_run : 1 ))}
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
if [ -n "${REPORT:-}" ]; then
  $REPORT "$RUNS" "${names[@]}"
else
  python3 -m latentforge compare "${names[@]}" --split "$SPLIT" --runs-dir "$RUNS" --out "$RUNS/compare"
fi
