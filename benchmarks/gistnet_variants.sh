#!/usr/bin/env bash
# Train GistNet variants side by side on one GPU (same data, same steps, one device call) and compare their
# validation curves. Concurrent runs share the GPU (no throughput gain, but equal-step curves in one call).
#   bash benchmarks/gistnet_variants.sh NAME='flags' [NAME2='flags' ...]
# Each variant runs `megacontext train gistnet --config configs/gistnet.yaml --out $RUNS/NAME <flags>`.
# Env: RUNS (checkpoints; default /tmp/gistnet_runs), OUT (metrics + comparison; default runs/variants),
#      PYTHON. Output: $OUT/metrics_NAME.jsonl, $OUT/variants.png, the comparison table on stdout; exits
#      non-zero if any run failed (its log tail is printed).
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-/tmp/gistnet_runs}
out=${OUT:-runs/variants}
py=${PYTHON:-python}
[ $# -ge 1 ] || { echo "usage: gistnet_variants.sh NAME='flags' ..." >&2; exit 2; }
mkdir -p "$runs" "$out"
names=() pids=()
for spec in "$@"; do
  name=${spec%%=*}
  flags=${spec#*=}
  names+=("$name")
  # shellcheck disable=SC2086  # flags are meant to split
  $py -m megacontext train gistnet --config configs/gistnet.yaml --out "$runs/$name" $flags \
    > "$runs/$name.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!names[@]}"; do
  wait "${pids[$i]}" || { rc=1; echo "== ${names[$i]} FAILED"; tail -20 "$runs/${names[$i]}.log"; }
  cp "$runs/${names[$i]}/metrics.jsonl" "$out/metrics_${names[$i]}.jsonl" 2>/dev/null
done
files=()
for n in "${names[@]}"; do [ -f "$out/metrics_$n.jsonl" ] && files+=("$out/metrics_$n.jsonl"); done
[ ${#files[@]} -gt 0 ] && $py benchmarks/gistnet_training_report.py --compare "${files[@]}" --png "$out/variants.png"
exit $rc
