#!/usr/bin/env bash
# Train gssm configs side by side on one GPU, probe each, and print the results tables
# (docs/results/gssm.md). Usage: bench/gssm/results.sh [CONFIG...] [-- override ...]
# CONFIG is a preset (gssm/sparse) or a YAML file; its run is named gssm-<last part of its name>.
# Default: the four study presets. Runs go to $LATENTFORGE_RUNS (default runs/).
set -euo pipefail
RUNS=${LATENTFORGE_RUNS:-runs}
LF=${LATENTFORGE:-"python3 -m latentforge"}
PROBE_EXAMPLES=${PROBE_EXAMPLES:-500}
configs=()
while [[ $# -gt 0 && $1 != "--" ]]; do configs+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
[[ ${#configs[@]} -eq 0 ]] && configs=(gssm/base gssm/sparse gssm/dense gssm/low_entropy)
mkdir -p "$RUNS"
names=()
for config in "${configs[@]}"; do
  name="gssm-$(basename "${config%.yaml}")"
  names+=("$name")
  $LF train "$config" "$@" --name "$name" --runs-dir "$RUNS" --overwrite --quiet > "$RUNS/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  $LF probe "$name" --runs-dir "$RUNS" --examples "$PROBE_EXAMPLES" --json > "$RUNS/$name/artifacts/probe.json"
done
python3 -m bench.gssm.summary "$RUNS" "${names[@]}"
