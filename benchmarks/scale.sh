#!/usr/bin/env bash
# Scale benchmark (issue 9): 100M-token tree ingest, per-token cost vs history, GistNet DDP scaling.
#   CPU side, once:  bash benchmarks/scale.sh stage
#       tokenises the held-out book part train_03 (~15M tokens, uint16, ~30 MB) into carry/scale/books_tokens.
#   GPU side, single GPU (carry: carry/scale):  bash benchmarks/scale.sh gpu1   (= ingest, then cost)
#       ingest: (a) 100M tokens (the 15M-token cache cycled ~7x) into stores/scale/h100000000, GistNet on the GPU;
#       cost:   (b) score/generate cost at histories 1e4, 1e6, 1e8 at w_max=2048 (reuses the 100M store if it is
#               still on the machine, else rebuilds it first). Split them if one call cannot take both.
#   GPU side, two GPUs (carry: carry/scale):  bash benchmarks/scale.sh gpu2
#       (c) GistNet training tokens/s with torchrun on 1 then 2 GPUs (same per-rank batch).
# Env: BASE (default: the embedded base-llama-19m-v2), GISTNET / LENSNET (checkpoints; default: untrained weights, same cost),
#      OUT (results dir; default docs/results), TOKENS (default 100000000), PYTHON.
# Output: $OUT/scale.{json,md}; every section records its command, commit and machine. With OUT=$OUT on a device
#   run, fold the fetched files into docs/results afterwards:
#       python benchmarks/scale_report.py merge <fetched>/scale.json [<fetched2>/scale.json ...]
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: scale.sh stage|gpu1|ingest|cost|gpu2}
py=${PYTHON:-python}
base=${BASE:-base-llama-19m-v2}
cache=carry/scale/books_tokens
out=${OUT:-docs/results}
tokens=${TOKENS:-100000000}
common=(--base "$base" --cache "$cache" --results "$out" --work stores/scale)
[[ -n "${GISTNET:-}" ]] && common+=(--gistnet "$GISTNET")
case "$part" in
  stage)
    $py -m megacontext data prepare --tokenizer "$base" --out "$cache" --overwrite --no-progress \
      --books ../shared/data/books/train_03.txt.xz
    du -sh "$cache" ;;
  gpu1)
    bash "$0" ingest
    bash "$0" cost ;;
  ingest)
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
    $py benchmarks/scale.py ingest "${common[@]}" --tokens "$tokens" --checkpoints 1e6,1e7,3e7,6e7 ;;
  cost)
    lens=()
    [[ -n "${LENSNET:-}" ]] && lens=(--lensnet "$LENSNET")
    $py benchmarks/scale.py cost "${common[@]}" "${lens[@]}" --tokens "$tokens" --histories "1e4,1e6,$tokens" \
      --w-max 2048 --score-tokens 1024 --gen-tokens 128 --focus lensnet ;;
  gpu2)
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
    for n in 1 2; do
      $py -m torch.distributed.run --standalone --nproc_per_node=$n benchmarks/scale.py ddp "${common[@]}" \
        --steps 200 --batch-size 16 --context 1024 --horizon 64
    done ;;
  *) echo "unknown part $part (stage|gpu1|ingest|cost|gpu2)" >&2; exit 2 ;;
esac
