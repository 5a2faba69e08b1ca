#!/usr/bin/env bash
# Issue-8 baseline comparison on one GPU.
#   Stage inputs here (CPU side):   bash benchmarks/run_suite.sh stage
#   Then on the GPU (carry: carry/bench), one command per part, each well under 10 minutes:
#     bash benchmarks/run_suite.sh ppl      # books_ppl + code_ppl: full, truncation, sinks, sinks-absolute, bm25
#     bash benchmarks/run_suite.sh probes   # far_recall, passkey, qmsum: same systems
#     bash benchmarks/run_suite.sh lingua   # far_recall, passkey, qmsum: llmlingua (slow: one compression per chunk)
#     bash benchmarks/run_suite.sh mc       # far_recall, passkey, qmsum: MegaContext systems + truncation/sinks/bm25
#                                           # in one invocation (one report), chunk = K = 32 for every system so all
#                                           # read the same budget; reduced sizes (8 per distance, 8 meetings) so it
#                                           # stays well under 10 min (estimate ~4 min on one H100). Needs
#                                           # models/gistnet-19m and models/lensnet-19m (tracked in the repo).
# Results: docs/results/bench_full_<part>/{results.json,results.md,*.png} (under $OUT on the device machine).
# The GPU image needs: pip install rank_bm25==0.2.2 llmlingua==0.2.2 (offline wheels under carry/ if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: run_suite.sh stage|ppl|probes|lingua|mc}
out_root=${OUT:-docs/results}
py=${PYTHON:-python}
case "$part" in
  stage)
    mkdir -p carry/bench
    rm -rf carry/bench/books_dev carry/bench/qmsum_test
    cp -r ../shared/data/books/dev carry/bench/books_dev
    cp -r ../shared/data/dialogue/qmsum/test carry/bench/qmsum_test
    du -sh carry/bench ;;
  ppl)
    $py -m megacontext.cli bench --suite full --tasks books_ppl code_ppl \
      --systems full truncation sinks sinks-absolute bm25 --out-dir "$out_root/bench_full_ppl" ;;
  probes)
    $py -m megacontext.cli bench --suite full --tasks far_recall passkey qmsum \
      --systems full truncation sinks sinks-absolute bm25 --out-dir "$out_root/bench_full_probes" ;;
  lingua)
    $py -m megacontext.cli bench --suite full --tasks far_recall passkey qmsum --per-distance 4 \
      --qmsum-max-meetings 8 --systems llmlingua --out-dir "$out_root/bench_full_lingua" ;;
  mc)
    $py -m megacontext.cli bench --suite full --tasks far_recall passkey qmsum --chunk 32 --per-distance 8 \
      --qmsum-max-meetings 8 --systems truncation sinks bm25 meanpool-recency megacontext-recency \
      megacontext-lexical megacontext-lensnet --out-dir "$out_root/bench_full_mc" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
