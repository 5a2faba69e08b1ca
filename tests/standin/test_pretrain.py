"""The training run on CPU with a tiny model: schedule, loss, forward across skips, resume, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from standin import checkpoint as C
from standin import pretrain as P

from .conftest import tiny_vocab_llama


def test_schedule_warmup_cosine_and_continuous_replan():
    s = P.Schedule(seg_start=10, warmup=5, peak=1e-3, min_frac=0.1, planned=110)
    assert s.lr(10) == pytest.approx(2e-4) and s.lr(14) == pytest.approx(1e-3)
    assert s.lr(15) == pytest.approx(1e-3) and s.lr(110) == pytest.approx(1e-4)
    assert s.lr(62) < s.lr(40)
    before = s.lr(50)
    s.replan(50, 300)  # a longer plan: same lr at the re-plan step, then a slower decay
    assert s.lr(50) == pytest.approx(before) and s.lr(300) == pytest.approx(1e-4)
    assert s.lr(110) > 1e-4 * 1.5
    s.replan(120, 121)
    assert s.lr(121) == pytest.approx(1e-4)


def test_loss_terms_mix_ce_and_kl():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tgt = torch.randint(0, 11, (3, 5))
    loss, ce = P.loss_terms(logits, tgt, None, torch.zeros(0, 5, dtype=torch.bool), torch.tensor(1.0))
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()).item())
    nb = torch.ones(2, 5, dtype=torch.bool)
    same, _ = P.loss_terms(logits, tgt, logits.detach()[:2], nb, torch.tensor(0.0))  # KL to itself = 0
    assert same.item() == pytest.approx(ce[2].sum().item() / 15, rel=1e-5)  # only the non-teacher row counts
    mixed, _ = P.loss_terms(logits, tgt, torch.randn(2, 5, 11), nb, torch.tensor(0.25))
    mixed.backward()
    assert logits.grad.abs().sum() > 0 and math.isfinite(mixed.item())


def test_book_ce_weight_spreads_a_fixed_number_of_passes(tiny_dir, books_xz):
    cfg = P.TrainConfig(init=str(tiny_dir), books=[str(books_xz)], book_ce_passes=2.0)
    assert P.book_ce_weight(cfg, True, 1000, 400, 10_000) == pytest.approx(0.05)  # 40 passes -> 2 of them CE
    assert P.book_ce_weight(cfg, True, 10, 10, 10_000) == 1.0 and P.book_ce_weight(cfg, False, 1000, 400, 1) == 1.0


def test_training_forward_attends_across_a_pose_skip():
    m = tiny_vocab_llama()
    x = torch.randint(0, 16384, (1, 64))
    y = x.clone()
    y[0, :8] = (y[0, :8] + 1) % 16384
    pos = torch.arange(64)[None].clone()
    pos[:, 32:] += 40000
    ones = torch.ones_like(x)
    with torch.no_grad():
        a, b = P.lm_logits(m, x, pos, ones), P.lm_logits(m, y, pos, ones)
    assert (a[0, 40:] - b[0, 40:]).abs().max() > 1e-4


def _cfg(tiny_dir, books_xz, code_root, out, **kw):
    base = dict(init=str(tiny_dir), books=[str(books_xz)], out=str(out), code_roots=[str(code_root)],
                code_max_chars=400_000, book_val_tokens=8_000, code_val_tokens=4_000, steps=3, batch=4, seq=128,
                log_every=1, eval_every=100, monitor_rows=1, warmup=1, device="cpu")
    return P.TrainConfig(**(base | kw))


def test_train_resume_export_and_join(tiny_dir, books_xz, code_root, tmp_path):
    run, exp = tmp_path / "run", tmp_path / "exp"
    st = P.train(_cfg(tiny_dir, books_xz, code_root, run, export=str(exp)))
    assert st["step"] == 3 and st["segment"] == 0 and st["segment_done"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if not r.get("final")]
    assert steps == [1, 2, 3] and {"loss", "ce", "lr", "tok_s", "elapsed", "ce_by_type"} <= set(lines[0])
    assert "val_books_nll" in lines[0]["held_out"] and lines[-1]["final"]
    assert st["passes"]["books"] > 0 and st["tokens"]["code"] > 0
    # the export fits the return limits and joins back to the same bytes
    files = sorted(p.name for p in exp.iterdir())
    assert len(files) <= 6 and all((exp / f).stat().st_size < 15 * 2**20 for f in files)
    joined = tmp_path / "joined"
    assert C.join(exp, tiny_dir, joined) == st["model_sha256"] == C.sha256(run / "model" / "model.safetensors")
    # resume continues the step counter, token counts and metrics (a new segment after a finished one)
    st2 = P.train(_cfg(tiny_dir, books_xz, code_root, run, resume=str(run), steps=2))
    assert st2["step"] == 5 and st2["segment"] == 1 and st2["tokens"]["books"] > st["tokens"]["books"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [4, 5, 5]
    # the saved model loads with plain transformers, bf16, and matches the run's weights
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(run / "model")
    assert m.dtype == torch.bfloat16 and m.config.vocab_size == 16384
    saved, init = (json.loads((d / "config.json").read_text()) for d in (run / "model", tiny_dir))
    assert {k: v for k, v in saved.items() if k != "dtype"} == {k: v for k, v in init.items() if k != "dtype"}


def test_resume_from_joined_export_restarts_the_optimizer(tiny_dir, books_xz, code_root, tmp_path):
    run, exp, joined = tmp_path / "run", tmp_path / "exp", tmp_path / "joined"
    P.train(_cfg(tiny_dir, books_xz, code_root, run, export=str(exp), steps=2, teacher="none"))
    C.join(exp, tiny_dir, joined)
    assert not (joined / "optimizer.safetensors").exists()  # the optimizer state never comes back
    st = P.train(_cfg(tiny_dir, books_xz, code_root, tmp_path / "run2", resume=str(joined), steps=1,
                      teacher="none"))
    assert st["step"] == 3 and st["segment"] == 1 and st["schedule"]["warmup"] == 1


def test_parts_round_trip(tmp_path):
    src = tmp_path / "model.safetensors"
    data = bytes(range(256)) * 1000
    src.write_bytes(data)
    parts = C.split_parts(src, tmp_path / "out", part_bytes=70_000)
    assert len(parts) == 4 and all(p.stat().st_size <= 70_000 for p in parts)
    back = C.join_parts(tmp_path / "out", tmp_path / "back" / "model.safetensors")
    assert back.read_bytes() == data


def test_optimizer_state_round_trip(tmp_path):
    m = tiny_vocab_llama()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
    m(input_ids=torch.randint(0, 16384, (1, 8))).logits.sum().backward()
    opt.step()
    names = {id(p): n for n, p in m.named_parameters()}
    C.save_optimizer(opt, names, tmp_path / "opt.safetensors")
    opt2 = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
    assert C.load_optimizer(opt2, names, tmp_path / "opt.safetensors") == len(names)
    p0 = next(m.parameters())
    assert torch.equal(opt.state[p0]["exp_avg"], opt2.state[p0]["exp_avg"])


def test_user_errors_are_one_line(tmp_path, capsys, books_xz, tiny_dir):
    assert P.main(["--init", str(tmp_path), "--books", str(books_xz)]) == 2
    assert "not a model dir" in capsys.readouterr().err
    dev = tmp_path / "books" / "dev"
    dev.mkdir(parents=True)
    (dev / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="held-out evaluation books"):
        P.TrainConfig(init=str(tiny_dir), books=[str(dev / "x.txt")])
