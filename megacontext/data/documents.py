"""Token documents from paths, for runs that read whole documents (LensNet labels, focus evaluation).

A path is one of: a token-cache directory (``index.json``, see :mod:`megacontext.data.token_cache`), a
``.safetensors`` file of 1-D token tensors (how small document sets travel to a GPU machine), or ``.txt``
files / directories of them (tokenised with ``encode``). Documents keep the order of the paths (and of
the sorted files / keys inside each), so a held-out split by position is stable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def load_docs(paths: Sequence[str], encode: Callable[[str], list[int]]) -> tuple[list[torch.Tensor], list[str]]:
    """(documents as int64 [n_i] tensors, their names) from ``paths`` (see the module docstring)."""
    from safetensors.torch import load_file

    docs, names = [], []
    for p in map(Path, paths):
        if (p / "index.json").is_file():
            from megacontext.data.token_cache import TokenCache

            cache = TokenCache.open(p)
            for i in range(cache.num_docs):
                docs.append(torch.from_numpy(cache.doc_tokens(i).astype("int64")))
                names.append(cache.doc_ids[i])
        elif p.suffix == ".safetensors":
            tensors = load_file(str(p))
            for k in sorted(tensors):
                docs.append(tensors[k].long())
                names.append(k)
        elif p.exists():
            files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
            for f in files:
                docs.append(torch.tensor(encode(f.read_text(errors="replace")), dtype=torch.long))
                names.append(f.stem)
        else:
            raise FileNotFoundError(f"document source {str(p)!r} does not exist (token cache dir, .safetensors "
                                    "of token tensors, or .txt files expected)")
    return docs, names


def split_docs(docs: list, names: list[str], every: int, held_out: bool) -> tuple[list, list[str]]:
    """Every ``every``-th document (0, k, 2k, ...) when ``held_out``, else all the others."""
    keep = [i for i in range(len(docs)) if (i % every == 0) == held_out]
    return [docs[i] for i in keep], [names[i] for i in keep]
