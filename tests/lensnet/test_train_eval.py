"""Training (learns a planted signal, resumes exactly), Spearman, and the end-to-end focus evaluation."""

import json

import torch
from safetensors.torch import save_file

from megacontext.lensnet.labels import META, LabelSet
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.lensnet.train import LensTrainConfig, spearman_per_context, train_lensnet


def _planted_labels(path, base, n_ctx=24, e=12, seed=0):
    """Synthetic cache: utility of every entry = its first embedding coordinate."""
    g = torch.Generator().manual_seed(seed)
    d = base.d_model
    ent = torch.randn(n_ctx * e, d, generator=g)
    lv = torch.randint(0, 3, (n_ctx * e,), generator=g)
    sig = ent[:, 0]
    gain = torch.where(lv > 0, sig, torch.tensor(float("nan")))
    loss = torch.where(lv == 0, sig, torch.tensor(float("nan")))
    shard = {"entries": ent.half(), "levels": lv, "indices": torch.arange(n_ctx * e), "ages": torch.rand(n_ctx * e),
             "expandable": lv > 0, "collapsible": lv == 0, "gain": gain, "loss": loss,
             "offsets": torch.arange(0, n_ctx * e + 1, e), "tail": torch.randint(0, 100, (n_ctx, 8), generator=g),
             "nll": torch.zeros(n_ctx), "t": torch.zeros(n_ctx, dtype=torch.long),
             "w_max": torch.zeros(n_ctx, dtype=torch.long), "doc": torch.arange(n_ctx) % 6}
    path.mkdir(parents=True)
    save_file(shard, str(path / "shard_00000.safetensors"))
    (path / META).write_text(json.dumps({"base_fingerprint": base.fingerprint, "config": {}, "compressor": "x"}))


def _cfg(tmp_path, steps):
    return LensTrainConfig(labels=str(tmp_path / "labels"), out=str(tmp_path / "run"), steps=steps, batch_size=8,
                           lr=1e-2, warmup=5, eval_every=20, save_every=20, val_fraction=0.34,
                           model=LensNetConfig(width_mult=1.0, layers=1, tail_tokens=8))


def test_training_learns_planted_signal(tiny_base, tmp_path):
    _planted_labels(tmp_path / "labels", tiny_base)
    full = train_lensnet(tiny_base, _cfg(tmp_path, 40))
    assert full["spearman"] > 0.4, full
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 40
    # resume: a second run of 60 steps in the same dir starts at 60 and does nothing but re-save
    net, meta = LensNet.load(tmp_path / "run" / "final", tiny_base)
    assert meta["step"] == 40 and meta["target_scale"] > 0


def test_resume_continues_from_saved_step(tiny_base, tmp_path):
    _planted_labels(tmp_path / "labels", tiny_base)
    cfg = _cfg(tmp_path, 10).replace(save_every=10)
    train_lensnet(tiny_base, cfg)
    train_lensnet(tiny_base, cfg.replace(steps=20))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_spearman_matches_naive():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.0]])
    t = torch.tensor([[1.0, 3.0, 2.0, 5.0, 7.0]])
    lab = torch.tensor([[True, True, True, True, False]])
    assert abs(float(spearman_per_context(s, t, lab)[0]) - 1.0) < 1e-6
    assert abs(float(spearman_per_context(-s, t, lab)[0]) + 1.0) < 1e-6


def test_labelset_split_holds_out_documents(tiny_base, tmp_path):
    _planted_labels(tmp_path / "labels", tiny_base)
    tr, va = LabelSet.load(tmp_path / "labels").split(0.34)
    assert {int(c["doc"]) for c in tr.ctx}.isdisjoint({int(c["doc"]) for c in va.ctx}) and len(va) > 0
