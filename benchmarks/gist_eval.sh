#!/usr/bin/env bash
# GistNet substitutability evaluation (issue 5): `megacontext eval gist` on held-out books, QMSum and code.
#   CPU side, once:  bash benchmarks/gist_eval.sh stage
#       tokenises dev books (all 34), QMSum val+test and a slice of the Python stdlib into carry/gist_eval/cache
#       (GistNet trains on train books only, so every document here is held out; ~12 MB).
#   GPU side (carry: carry/gist_eval, plus the GistNet dir if it is not committed):
#       bash benchmarks/gist_eval.sh run [extra `megacontext eval gist` flags, e.g. --lod2 true]
# Env: BASE (default: the embedded base-llama-19m-v2), GISTNET (default: the embedded gistnet-19m-v2), CACHE (default
#      carry/gist_eval/cache), WINDOWS per domain (default 2000), OUT (results dir; default docs/results).
# Output: $OUT/gist_eval.{json,md} (command, commit and machine recorded inside) + $OUT/gist_eval_scores.npz.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gist_eval.sh stage|run [flags]}
shift
py=${PYTHON:-python}
base=${BASE:-base-llama-19m-v2}
cache=${CACHE:-carry/gist_eval/cache}
stdlib=$($py -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
case "$part" in
  stage)
    code=()
    for d in asyncio email http json logging concurrent importlib multiprocessing urllib xml unittest tomllib; do
      code+=("$stdlib/$d")
    done
    $py -m megacontext data prepare --tokenizer "$base" --out "$cache" --overwrite --no-progress \
      --docs ../shared/data/books/dev --qmsum ../shared/data/dialogue/qmsum/val ../shared/data/dialogue/qmsum/test \
      --code "${code[@]}"
    $py -m megacontext data info "$cache" --context 1024 --horizon 64 ;;
  run)
    out=${OUT:-docs/results}
    mkdir -p "$out"
    $py -m megacontext.cli.eval gist --base "$base" --gistnet "${GISTNET:-gistnet-19m-v2}" \
      --cache "$cache" --split all --windows "${WINDOWS:-2000}" --batch-size 64 \
      --cram.windows 32 --cram.steps 300 --cram.batch 16 \
      --out-dir "$out" --scores "$out/gist_eval_scores.npz" "$@" ;;
  *) echo "unknown part $part (expected stage or run)" >&2; exit 2 ;;
esac
