"""``megacontext data prepare`` / ``data info`` end to end, plus an optional run on a slice of ../shared."""

from __future__ import annotations

import pytest

from megacontext.cli import main
from megacontext.data.token_cache import TokenCache
from megacontext.data.windows import WindowConfig, WindowSampler
from tests.conftest import BASE_19M, SHARED


@pytest.fixture
def tokenizer_dir(tokenizer, tmp_path):
    path = tmp_path / "tok"
    tokenizer.save_pretrained(path)
    return path


def test_prepare_and_info(corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["data", "prepare", "--books", *map(str, corpus["books"]), "--docs", *map(str, corpus["docs"]),
            "--qmsum", *map(str, corpus["qmsum"]), "--code", *map(str, corpus["code"]),
            "--tokenizer", str(tokenizer_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dialogue" in text and "code" in text and "books:too_short=1" in text and "books:empty=1" in text
    cache = TokenCache.open(out)
    assert cache.docs_per_domain() == {"books": 7, "code": 2, "dialogue": 3}
    assert main(argv) == 2  # refuses to overwrite without --overwrite
    assert "already holds a token cache" in capsys.readouterr().err
    assert main(["data", "info", str(out), "--context", "64", "--horizon", "8"]) == 0
    info = capsys.readouterr().out
    assert f"{cache.num_tokens:,}" in info and "train:" in info and "windows of 64+8" in info


def test_prepare_errors_are_one_line(tmp_path, tokenizer_dir, capsys):
    assert main(["data", "prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to prepare" in capsys.readouterr().err
    assert main(["data", "prepare", "--docs", str(tmp_path / "missing.txt"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "not a token cache" in capsys.readouterr().err


@pytest.mark.shared
def test_prepare_shared_slice(tmp_path, capsys):
    dev = sorted((SHARED / "data" / "books" / "dev").glob("*.txt"))[0]
    qmsum = sorted((SHARED / "data" / "dialogue" / "qmsum" / "val").glob("*.json"))[:3]
    out = tmp_path / "shared-cache"
    assert main(["data", "prepare", "--docs", str(dev), "--qmsum", *map(str, qmsum), "--tokenizer", str(BASE_19M),
                 "--out", str(out), "--no-progress"]) == 0
    cache = TokenCache.open(out)
    assert cache.index["dtype"] == "uint16" and cache.vocab_size == 16384
    assert cache.tokens_per_domain()["books"] > 100_000  # dev books are >= ~110k tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE_19M)
    cache.check_tokenizer(tok)
    i = cache.doc_ids.index(f"qmsum/val/{qmsum[0].stem}")
    a, b = cache.turn_token_spans(i)[1]
    assert ":" in tok.decode(cache.doc_tokens(i)[a:b].tolist())
    batch = next(WindowSampler(cache, WindowConfig(context=2048, horizon=64, split="all")).batches(2))
    assert batch.tokens.shape == (2, 2112)


def test_prepare_max_chars_caps_each_source(corpus, tokenizer_dir, tmp_path, capsys):
    def prepare(out, *extra):
        return main(["data", "prepare", "--docs", *map(str, corpus["docs"]), "--code", *map(str, corpus["code"]),
                     "--tokenizer", str(tokenizer_dir), "--out", str(out), "--no-progress", *extra])

    assert prepare(tmp_path / "capped", "--max-chars", "900") == 0
    assert prepare(tmp_path / "full") == 0
    capsys.readouterr()
    capped, full = TokenCache.open(tmp_path / "capped"), TokenCache.open(tmp_path / "full")
    for dom in ("books", "code"):  # each source keeps at most 900 characters' worth of tokens
        assert 0 < capped.tokens_per_domain()[dom] < full.tokens_per_domain()[dom]
    assert prepare(tmp_path / "bad", "--max-chars", "-1") == 2
    assert "--max-chars=-1" in capsys.readouterr().err
