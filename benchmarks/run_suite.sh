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
#                                           # the embedded gistnet-19m-v2 and lensnet-19m-v2-lex (shipped in the package).
#     bash benchmarks/run_suite.sh ppl_mc   # books_ppl + code_ppl: MegaContext systems + full/truncation/sinks/bm25
#                                           # in one invocation, chunk 128 for every system (estimate below)
#     bash benchmarks/run_suite.sh headline # issue 17's headline: the three parts below side by side on one GPU,
#                                           # then benchmarks/bench_headline.py merges them (bench_headline/)
#     bash benchmarks/run_suite.sh lingua_small  # far_recall + passkey: llmlingua at few probes, with matched
#                                           # truncation / bm25 / megacontext-lensnet rows (estimate below)
# Results: docs/results/bench_full_<part>/{results.json,results.md,*.png} (under $OUT on the device machine).
# The GPU image needs: pip install rank_bm25==0.2.2 llmlingua==0.2.2 (offline wheels under carry/ if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: run_suite.sh stage|ppl|probes|lingua|mc|ppl_mc|lingua_small|rawfirst|oracle|headline}
out_root=${OUT:-docs/results}
py=${PYTHON:-python}
bench=("$py" -m megacontext bench --suite full)
# Reduced sizes shared by the MegaContext comparisons, so every report of a kind scores the same samples.
ppl_small=(--tasks books_ppl code_ppl --chunk 128 --books-max-docs 8 --ppl-max-tokens 32768
           --probe-docs-max-tokens 32768 --code-max-docs 8 --position-buckets 0 256 1024 2048 4096 8192 16384 32768)
probes_small=(--chunk 32 --per-distance 8 --qmsum-max-meetings 8)  # with --tasks far_recall passkey [qmsum]
case "$part" in
  stage)
    mkdir -p carry/bench
    rm -rf carry/bench/books_dev carry/bench/qmsum_test
    cp -r ../shared/data/books/dev carry/bench/books_dev
    cp -r ../shared/data/dialogue/qmsum/test carry/bench/qmsum_test
    du -sh carry/bench ;;
  ppl)
    $py -m megacontext bench --suite full --tasks books_ppl code_ppl \
      --systems full truncation sinks sinks-absolute bm25 --out-dir "$out_root/bench_full_ppl" ;;
  probes)
    $py -m megacontext bench --suite full --tasks far_recall passkey qmsum \
      --systems full truncation sinks sinks-absolute bm25 --out-dir "$out_root/bench_full_probes" ;;
  lingua)
    $py -m megacontext bench --suite full --tasks far_recall passkey qmsum --per-distance 4 \
      --qmsum-max-meetings 8 --systems llmlingua --out-dir "$out_root/bench_full_lingua" ;;
  mc)
    "${bench[@]}" --tasks far_recall passkey qmsum "${probes_small[@]}" --systems truncation sinks bm25 \
      meanpool-recency megacontext-recency megacontext-lexical megacontext-lensnet \
      --out-dir "$out_root/bench_full_mc" ;;
  ppl_mc)
    # Sizes: 8 dev books + the 8 largest stdlib modules of the device's Python, first 32,768 tokens each,
    # chunk 128 (= recent_raw; chunk 32 means 4x the chunks and does not fit) -> ~4,100 chunks per system and
    # budget, ~8,200 over both. Estimate for one H100, from CPU timings of the chunk build (1 thread, commit
    # 91688f5, docs/results/chunk_build.md; ms per chunk at W 1024/2048 with a 32k-token history):
    # megacontext-recency 4.0/4.5, meanpool-recency 4.1/5.0, megacontext-lensnet 15.5/19.1 outside the
    # network, of which ~6 ms is the allocator (4 rounds, CPU on both machines) and most of the rest is entry
    # embedding/padding that runs on the GPU there; the network itself is one batched call per 64 chunks
    # and round (~3 ms on the GPU, launch-bound):
    #   chunk builds     8,200 x (4.3 + 4.6 + 10..17) ms                      ~ 160-215 s
    #   base forwards    6 systems x 4,100 x (1,024 + 2,048) slots = 75M slots, batched 64 x 2,048,
    #                    at 1.3-2.6M slots/s                                   ~  30-60 s
    #   bm25 selection   ~30 ms a chunk, one worker per document (8 docs)     ~  30 s
    #   start-up, tokenising, gisting 0.5M tokens twice, bootstrap + plots    ~  50 s
    #   total                                                                 ~ 4.5-6 min (< 8 min)
    # If it runs long, --ppl-max-tokens 24576 cuts every term but start-up by a quarter.
    # megacontext-lexical is left out: LexicalFocus searches the whole prefix in each of its 4 rounds,
    # 33-41 ms per chunk -> ~5 more minutes.
    "${bench[@]}" "${ppl_small[@]}" \
      --systems full truncation sinks bm25 meanpool-recency megacontext-recency megacontext-lensnet \
      --out-dir "$out_root/bench_full_ppl_mc" ;;
  lingua_small)
    # LLMLingua compresses the whole history once per chunk: the last run did 24 far-recall probes at W 1024
    # (chunk 128, ~1.5 chunks a probe, ~38k history tokens on average: ~1.36M tokens) in 181 s on one H100,
    # i.e. ~7.5k history tokens/s. Here chunk 256 makes every probe one chunk (far-recall targets are <= 255
    # tokens, passkey ~6), 2 probes per distance: 2 tasks x 12 probes x 2 budgets x ~38k tokens = 1.8M tokens
    # ~ 240 s, plus ~40 s start-up and ~15 s for the matched reference rows (truncation, bm25,
    # megacontext-lensnet at the same chunk) -> ~5 min (< 6 min). If it runs long, --w-max 1024 halves the
    # LLMLingua part. QMSum is left out: its ~10k-token transcripts with multi-chunk answers cost ~100 s per
    # budget for 8 meetings, and 1-2 meetings would say nothing.
    $py -m megacontext bench --suite full --tasks far_recall passkey --chunk 256 --per-distance 2 \
      --systems llmlingua truncation bm25 megacontext-lensnet --out-dir "$out_root/bench_full_lingua_small" ;;
  rawfirst)
    # The raw-first starting tiling (WorkingContextConfig.recency="raw_first": longest raw suffix, everything
    # older at the coarsest level) next to the default "spread" tiling and truncation, on the ppl_mc sizes
    # and on the probes at the mc sizes. Two reports; ~2.5 min + ~2 min on one H100.
    "${bench[@]}" "${ppl_small[@]}" \
      --systems truncation megacontext-recency megacontext-rawfirst megacontext-lensnet-rawfirst \
      --out-dir "$out_root/bench_full_ppl_rawfirst"
    "${bench[@]}" --tasks far_recall passkey qmsum "${probes_small[@]}" --systems truncation bm25 \
      megacontext-recency megacontext-rawfirst \
      megacontext-lensnet megacontext-lensnet-rawfirst --out-dir "$out_root/bench_full_mc_rawfirst" ;;
  oracle)
    # Evidence-oracle focus (megacontext/focus/oracles.py: expands exactly the gists covering the probe's evidence,
    # same allocator and rounds) as the upper bound for the learned policy, on the mc probe sizes. ~2 min.
    "${bench[@]}" --tasks far_recall passkey "${probes_small[@]}" --systems truncation bm25 megacontext-recency \
      megacontext-lensnet megacontext-oracle megacontext-rawfirst \
      megacontext-lensnet-rawfirst megacontext-oracle-rawfirst --out-dir "$out_root/bench_full_oracle" ;;
  headline)
    # The product default (`megacontext`: v2 base, embedded GistNet and LensNet, focus as EngineConfig's
    # "auto" resolves it) against truncation, sinks, BM25, LLMLingua and the recency / lexical / evidence-oracle
    # MegaContext rows. Seven invocations run side by side (one GPU, 16 cores; 1-6 min each alone); invocations
    # with the same sample settings (seed, tasks, sizes, chunk) score the same samples and are merged into one
    # part by benchmarks/bench_headline.py, which writes bench_headline/results.{md,json}:
    #   probes (+ probes_bm25): far_recall + passkey + qmsum at chunk 32 (the mc sizes)
    #   ppl (+ ppl_mc):         books_ppl + code_ppl at the ppl_mc sizes (chunk 128)
    #   lingua:                 far_recall + passkey at the lingua_small sizes, matched truncation / bm25 / megacontext
    #   rawfirst, ppl_rawfirst: megacontext-lensnet-rawfirst and megacontext-tail512 (a 512-token raw tail) on the
    #                           probe and perplexity samples (merged likewise)
    # Needs rank_bm25 and llmlingua (offline: pip install --no-deps --no-index carry/wheels/*.whl).
    # HEADLINE_ONLY="probes lingua" runs a subset (e.g. to redo one part).
    hl="$out_root/bench_headline"
    mkdir -p "$hl"
    declare -A cmd
    cmd[probes]="--tasks far_recall passkey qmsum ${probes_small[*]} --systems truncation sinks megacontext-recency megacontext-lexical megacontext megacontext-oracle"
    cmd[probes_bm25]="--tasks far_recall passkey qmsum ${probes_small[*]} --systems bm25 truncation"
    cmd[ppl]="${ppl_small[*]} --systems full truncation sinks bm25 megacontext-recency"
    cmd[ppl_mc]="${ppl_small[*]} --systems megacontext"
    # the raw-first tiling under the learned focus: the lever the first headline (docs/focus_v2.md) points to
    cmd[rawfirst]="--tasks far_recall passkey qmsum ${probes_small[*]} --systems megacontext-lensnet-rawfirst megacontext-tail512 truncation"
    cmd[ppl_rawfirst]="${ppl_small[*]} --systems megacontext-lensnet-rawfirst megacontext-tail512 truncation"
    cmd[lingua]="--tasks far_recall passkey --chunk 256 --per-distance 2 --systems llmlingua truncation bm25 megacontext"
    pids=()
    for name in ${HEADLINE_ONLY:-probes probes_bm25 ppl ppl_mc lingua rawfirst ppl_rawfirst}; do
      # shellcheck disable=SC2086  # the flag strings are meant to split
      "${bench[@]}" ${cmd[$name]} --out-dir "$hl/$name" > "$hl/$name.log" 2>&1 &
      pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    $py benchmarks/bench_headline.py --parts "$hl"/*/ --out "$hl" || rc=$?
    exit $rc ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
