"""Stage the data of ``benchmarks/lensnet_v2.py`` (CPU, no network): token ids of training books and QMSum.

Reads ``../shared`` (see its README) and writes, under ``--out`` (default ``carry/focus_v2``, ignored by git
and carried with the device run):
- ``books.safetensors.xz``: ``tokens`` (int16 when every id fits, else int32) and ``offsets`` [B + 1] of the
  first ``--max-book-tokens`` tokens of ``--books`` books of ``train_03`` (a part the base was *not* trained on);
- ``qmsum.safetensors.xz`` (``tokens``, ``offsets``) + ``qmsum.json``: the QMSum *train* split's meetings with
  their specific queries, answers and evidence as token ranges (the benchmark uses other splits).
Tokenised with the embedded v2 base's tokenizer. Sizes are printed; the default is ~4.6 MiB, so a lean
copy of the checkout (docs removed, the three embedded models kept) plus this stays under the device's 64 MiB.

    python benchmarks/lensnet_v2_stage.py --shared ../shared --out carry/focus_v2
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from megacontext.core.assets import BASE_MODEL, embedded  # noqa: E402
from megacontext.data.qmsum import read_qmsum  # noqa: E402
from megacontext.data.tokenization import encode_texts, encode_with_char_map  # noqa: E402


def _save(path: Path, arrays: list[np.ndarray]) -> None:
    """xz-compressed safetensors (token ids compress ~2x, transcripts ~3x: the device copy is size-limited)."""
    tokens = np.concatenate(arrays).astype(np.int32)
    dtype = torch.int16 if tokens.max() < 2**15 else torch.int32
    offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])])
    blob = save({"tokens": torch.from_numpy(tokens).to(dtype), "offsets": torch.from_numpy(offsets)})
    path.write_bytes(lzma.compress(blob, preset=9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="carry/focus_v2")
    ap.add_argument("--books", type=int, default=72, help="books of train_03 to keep")
    ap.add_argument("--max-book-tokens", type=int, default=40_000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(embedded(BASE_MODEL)))
    dtype = np.dtype(np.int32)

    with lzma.open(Path(args.shared) / "data/books/train_03.txt.xz", "rt", encoding="utf-8") as fh:
        texts = [t for t in fh.read().split("\x1e") if len(t) > 200_000][: args.books]
    books = [ids[: args.max_book_tokens] for ids in encode_texts(tok, texts, dtype)]
    _save(out / "books.safetensors.xz", books)

    meetings, index = [], []
    for doc in read_qmsum([Path(args.shared) / "data/dialogue/qmsum/train"]):
        ids, turn_tok = encode_with_char_map(tok, doc.text, doc.meta["turn_chars"], dtype)
        ends = list(turn_tok[1:]) + [len(ids)]
        queries = [{"query": q["query"], "answer": q["answer"],
                    "spans": [[int(turn_tok[a]), int(ends[b])] for a, b in q["relevant_text_span"]]}
                   for q in doc.meta["queries"]["specific"] if q.get("relevant_text_span")]
        if queries:
            meetings.append(ids)
            index.append({"id": doc.doc_id, "queries": queries})
    _save(out / "qmsum.safetensors.xz", meetings)
    (out / "qmsum.json").write_text(json.dumps(index))
    sizes = {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(out.iterdir())}
    print(json.dumps({"books": len(books), "book_tokens": int(sum(b.shape[0] for b in books)),
                      "meetings": len(meetings), "meeting_tokens": int(sum(m.shape[0] for m in meetings)),
                      "MiB": sizes, "total_MiB": round(sum(sizes.values()), 2)}, indent=1))


if __name__ == "__main__":
    main()
