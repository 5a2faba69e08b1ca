#!/usr/bin/env bash
# GistNet v2 (issue 16) in one GPU call: recipe variants trained side by side on one GPU at equal wall-clock
# budget, then each evaluated by `megacontext eval gist` (copy probe, wrong-gist control, reconstruction).
#
#   CPU side, once:  bash benchmarks/gistnet_v2.sh stage            # xz text into carry/gist (~20 MB)
#   GPU side:        BASE=... bash benchmarks/gistnet_v2.sh run OUT [variant ...]   (carry: carry/gist)
#
# Text travels as xz (~0.3 bytes/char; token caches would be ~0.55) and is tokenised on the GPU machine,
# whose own Python sources (site-packages for training, the stdlib for evaluation) are the code corpus.
# Variants (objective overrides of configs/gistnet_v2.yaml; equal wall-clock budget, time-planned steps):
#   subst       v1 objective (horizon NLL + dense KL)  -- the existing recipe, retrained on this base
#   copy        + planted copies of gisted blocks scored by KL to the raw model
#   recon       + reconstruction NLL of [BOS][gist][block]
#   copy_recon  + both
#   hidden      copy_recon with base hidden states as LOD1 inputs
#   recon_base4 / recon_base8  recon with encoder='base': a trainable copy of the base's first 4 / 8 layers
#               reading the block + one gist slot (gistnet.prefix_encoder), pretrained layers at lr x 0.3
#   recon_distill  recon + distillation toward per-block optimised vectors (targets made first in the same
#               call from the training cache: DISTILL_BLOCKS blocks, default 50k, starting from GISTNET_INIT or
#               mean pooling)
# Env: BASE (base model dir, required for run), MINUTES (training wall per variant, default 5.5),
#      TRAIN_CHARS (characters per training source, default 20M), WINDOWS (eval windows per domain, default 400),
#      EXTRA_TRAIN / EXTRA_EVAL (more flags for every variant's training / evaluation, e.g. for a CPU smoke run).
# Output in OUT: one <variant>.tar.gz each (bf16 checkpoint, metrics.jsonl, gist_eval_<variant>.{json,md}),
#      gistnet_v2_summary.md (one row per variant) and the run log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, not an installed copy
part=${1:?usage: gistnet_v2.sh stage | run OUT [variant ...]}
shift
py=${PYTHON:-python3}
carry=${CARRY:-carry/gist}

case "$part" in
  stage)
    books=${BOOKS:-../shared/data/books}
    mkdir -p "$carry"
    # training text: part 00 (the base v2 continuation trained on 03), cut to keep the carry small
    { xz -dc "$books/train_00.txt.xz" || true; } | head -c "${STAGE_TRAIN_BYTES:-40000000}" \
      | xz -6 -T2 > "$carry/train_00.txt.xz"  # (xz stops on SIGPIPE once head has enough)
    # held-out evaluation text: every 2nd dev book, QMSum val + test
    tar -C "$books" -cJf "$carry/dev_books.tar.xz" $(cd "$books" && ls dev/*.txt | awk 'NR % 2 == 1')
    tar -C "${QMSUM:-../shared/data/dialogue/qmsum}" -cJf "$carry/qmsum.tar.xz" val test
    du -b "$carry"/* ;;
  run)
    out=${1:?usage: gistnet_v2.sh run OUT [variant ...]}
    shift
    variants=("$@")
    [ ${#variants[@]} -gt 0 ] || variants=(subst copy recon copy_recon)
    base=${BASE:?set BASE to the base model directory}
    work=${WORK:-runs/gistnet_v2}
    mkdir -p "$out" "$work/eval_text"
    log="$out/gistnet_v2.log"
    exec > >(tee -a "$log") 2>&1
    site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    stdlib=$($py -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    tar -C "$work/eval_text" -xJf "$carry/dev_books.tar.xz"
    tar -C "$work/eval_text" -xJf "$carry/qmsum.tar.xz"
    chars=${TRAIN_CHARS:-20000000}
    echo "== $(date -u +%T) token caches"
    # `wait` must name its jobs (a bare wait would also wait for the tee of the log, forever); a failed job
    # is reported and its variant dropped, the others go on
    wait_all() { local j rc=0; for j in "${jobs_[@]}"; do wait "$j" || { echo "job $j failed"; rc=1; }; done; return $rc; }
    jobs_=()
    $py -m megacontext.cli data prepare --tokenizer "$base" --out "$work/tok/train" --overwrite --no-progress \
      --books "$carry"/train_*.txt.xz --code "$site" --max-chars "$chars" & jobs_+=($!)
    $py -m megacontext.cli data prepare --tokenizer "$base" --out "$work/tok/dev" --overwrite --no-progress \
      --docs "$work/eval_text/dev" --max-chars 4000000 & jobs_+=($!)
    $py -m megacontext.cli data prepare --tokenizer "$base" --out "$work/tok/eval" --overwrite --no-progress \
      --docs "$work/eval_text/dev" --qmsum "$work/eval_text/val" "$work/eval_text/test" \
      --code "$stdlib" --max-chars 12000000 & jobs_+=($!)
    wait "${jobs_[@]}"
    declare -A flags=(
      [subst]="--objective.copy-frac 0 --objective.copy-weight 0 --objective.recon-weight 0"
      [copy]="--objective.recon-weight 0"
      [recon]="--objective.copy-frac 0 --objective.copy-weight 0"
      [copy_recon]=""
      [hidden]="--model.inputs hidden"
      [recon_base4]="--objective.copy-frac 0 --objective.copy-weight 0 --model.encoder base --model.layers 4 --encoder-lr-mult 0.3"
      [recon_base8]="--objective.copy-frac 0 --objective.copy-weight 0 --model.encoder base --model.layers 8 --encoder-lr-mult 0.3"
      [recon_distill]="--objective.copy-frac 0 --objective.copy-weight 0 --distill $work/distill --objective.distill-weight 1.0"
    )
    if [[ " ${variants[*]} " == *" recon_distill "* ]]; then
      echo "== $(date -u +%T) distillation targets"
      $py benchmarks/gistnet_distill_targets.py --cache "$work/tok/train" --out "$work/distill" --base "$base" \
        --gistnet "${GISTNET_INIT:-none}" --blocks "${DISTILL_BLOCKS:-50000}" > "$work/distill.log" 2>&1
      tail -n 1 "$work/distill.log"
    fi
    jobs_=()
    echo "== $(date -u +%T) training ${variants[*]} for ${MINUTES:-5.5} min each, side by side"
    for v in "${variants[@]}"; do
      [ -n "${flags[$v]+x}" ] || { echo "unknown variant $v" >&2; exit 2; }
      # shellcheck disable=SC2086  # the flag strings are meant to split
      $py -m megacontext.cli train gistnet --config configs/gistnet_v2.yaml --base "$base" \
        --data "$work/tok/train" --val-data "$work/tok/dev" --out "$work/$v" \
        --max-minutes "${MINUTES:-5.5}" ${flags[$v]} ${EXTRA_TRAIN:-} > "$work/$v.train.log" 2>&1 & jobs_+=($!)
    done
    wait_all || true
    jobs_=()
    done_=()
    echo "== $(date -u +%T) exporting (bf16) and evaluating"
    for v in "${variants[@]}"; do
      tail -n 2 "$work/$v.train.log"
      $py benchmarks/gistnet_export.py "$work/$v" "$work/export/$v" --base "$base" \
        --check-cache "$work/tok/dev" || { echo "$v: no checkpoint"; continue; }
      done_+=("$v")
      cp "$work/$v/metrics.jsonl" "$work/export/$v/"
      $py -m megacontext.cli.eval gist --base "$base" --gistnet "$work/export/$v" --cache "$work/tok/eval" \
        --split all --windows "${WINDOWS:-400}" --batch-size 64 --cram.windows 0 \
        --recon.cram-blocks "${RECON_CRAM:-64}" --recon.cram-steps 300 \
        --out-dir "$work/export/$v" --name "gist_eval_$v" ${EXTRA_EVAL:-} > "$work/$v.eval.log" 2>&1 & jobs_+=($!)
    done
    wait_all || true
    evaluated=()
    for v in "${done_[@]}"; do
      tail -n 3 "$work/$v.eval.log"
      tar -C "$work/export" -czf "$out/$v.tar.gz" "$v"
      # the evaluation alone as well: a large checkpoint's tarball may exceed what comes back from a device
      tar -C "$work/export" -czf "$out/$v.eval.tar.gz" --exclude='*.safetensors' "$v"
      [ -f "$work/export/$v/gist_eval_$v.json" ] && evaluated+=("$v")
    done
    [ ${#evaluated[@]} -gt 0 ] && $py benchmarks/gistnet_v2_summary.py "$work/export" "${evaluated[@]}" \
      | tee "$out/gistnet_v2_summary.md"
    echo "== $(date -u +%T) done" ;;
  *) echo "unknown part $part (expected stage or run)" >&2; exit 2 ;;
esac
