"""Checkpoints of a stand-in training run, and the export that fits the GPU tool's return limits.

Run directory (``--out``, on the training machine's local disk):
  model/              HF model dir: config.json, generation_config.json, tokenizer files (copied from the
                      init model), model.safetensors (ONE file, bf16, tied lm_head omitted as HF does)
  state.json          step counter, schedule, token counts and passes, config, sha256 of model.safetensors
  optimizer.safetensors  AdamW moments (fp32) keyed by parameter name: safetensors, never pickle; too big
                      to bring back from a GPU call, so a resume on a fresh machine restarts the optimizer
  metrics.jsonl, train.log

Export directory (``--export``, the GPU call's $OUT): at most 8 files, each < 16 MiB:
  model.safetensors.part00 .. partNN   byte slices (< 15 MiB each) of model/model.safetensors: joined
                      (``python -m standin.checkpoint join``) they are that file, byte for byte, so the
                      sha256 recorded in state.json and in the evaluation report is the committed file's
  state.json, metrics.jsonl, train.log (+ the evaluation's standin_base.json / .md written beside them)
``join`` rebuilds a loadable run directory: model.safetensors from the parts, config.json from state.json,
tokenizer and generation config copied from the init model dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PART_BYTES = 15 * 1024 * 1024 - 4096  # under the 16 MiB per-file return limit, with room to spare
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes | str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def save_model(model, model_dir: Path, init_dir: Path) -> str:
    """bf16 single-file safetensors + config; tokenizer files from ``init_dir``. Returns the file's sha256."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    sd = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue  # tied to the input embedding: HF omits it and re-ties on load
        sd[k] = v.detach().to("cpu", torch.bfloat16).contiguous()
    tmp = model_dir / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, model_dir / "model.safetensors")
    _atomic_write(model_dir / "config.json", json.dumps(model_config(model, init_dir), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        src = Path(init_dir) / name
        if src.exists() and src.resolve() != (model_dir / name).resolve():
            shutil.copyfile(src, model_dir / name)
    return sha256(model_dir / "model.safetensors")


def model_config(model, init_dir: Path) -> dict:
    """The init model's config.json (the architecture never changes in a warm start), checked against the
    model being saved; bf16 as stored. Keeps v1's extra keys (rope_theta beside rope_parameters for
    transformers 4.x, native_window) verbatim."""
    src = Path(init_dir) / "config.json"
    cfg = json.loads(src.read_text()) if src.exists() else model.config.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size"):
        if key in cfg and cfg[key] != getattr(model.config, key):
            raise ValueError(f"model {key}={getattr(model.config, key)} differs from {src}: {cfg[key]}")
    cfg["dtype"] = "bfloat16"
    cfg.pop("torch_dtype", None)
    return cfg


def save_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], path: Path):
    """AdamW state as safetensors: '<param>.exp_avg', '<param>.exp_avg_sq', '<param>.step'."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    t = st[k]
                    out[f"{n}.{k}"] = (t if torch.is_tensor(t) else torch.tensor(float(t))).detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp))
    os.replace(tmp, path)


def load_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], path: Path) -> int:
    """Restore moments saved by ``save_optimizer``; returns how many parameters were restored."""
    saved = load_file(str(path))
    n_loaded = 0
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if f"{n}.exp_avg" not in saved:
                continue
            st = opt.state[p]
            st["exp_avg"] = saved[f"{n}.exp_avg"].to(p.device, p.dtype)
            st["exp_avg_sq"] = saved[f"{n}.exp_avg_sq"].to(p.device, p.dtype)
            step = saved.get(f"{n}.step", torch.tensor(0.0))
            # fused/capturable AdamW keep 'step' as a float tensor on the param's device
            st["step"] = step.to(torch.float32).to(p.device if group.get("fused") else "cpu").reshape(())
            n_loaded += 1
    return n_loaded


def write_state(run_dir: Path, state: dict):
    _atomic_write(run_dir / "state.json", json.dumps(state, indent=1, sort_keys=True) + "\n")


def read_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "state.json").read_text())


# ---------------------------------------------------------------- export parts
def split_parts(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Byte slices of ``path`` named ``<name>.partNN`` in ``out_dir`` (stale parts removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(path.name + ".part*"):
        old.unlink()
    parts = []
    with open(path, "rb") as f:
        i = 0
        while chunk := f.read(part_bytes):
            p = out_dir / f"{path.name}.part{i:02d}"
            _atomic_write(p, chunk)
            parts.append(p)
            i += 1
    return parts


def join_parts(parts_dir: Path, dest: Path, name: str = "model.safetensors") -> Path:
    parts = sorted(Path(parts_dir).glob(name + ".part*"))
    if not parts:
        raise FileNotFoundError(f"no {name}.partNN files in {parts_dir}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    os.replace(tmp, dest)
    return dest


def export(run_dir: Path, export_dir: Path):
    """Copy the returnable files of ``run_dir`` into ``export_dir`` (see module docstring)."""
    export_dir.mkdir(parents=True, exist_ok=True)
    split_parts(run_dir / "model" / "model.safetensors", export_dir)
    for name in ("state.json", "metrics.jsonl", "train.log"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, export_dir / name)


def join(export_dir: Path, init_dir: Path, run_dir: Path) -> str:
    """Rebuild a run dir (loadable model/ + state/metrics/log) from an export; checks the sha256."""
    state = read_state(export_dir)
    model_dir = run_dir / "model"
    join_parts(export_dir, model_dir / "model.safetensors")
    digest = sha256(model_dir / "model.safetensors")
    if state.get("model_sha256") and digest != state["model_sha256"]:
        raise ValueError(f"joined model.safetensors has sha256 {digest}, state.json says {state['model_sha256']}")
    _atomic_write(model_dir / "config.json", json.dumps(state["model_config"], indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(init_dir) / name).exists():
            shutil.copyfile(Path(init_dir) / name, model_dir / name)
    for name in ("state.json", "metrics.jsonl", "train.log", "standin_base.json", "standin_base.md"):
        if (export_dir / name).exists() and export_dir.resolve() != run_dir.resolve():
            shutil.copyfile(export_dir / name, run_dir / name)
    return digest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m standin.checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("join", help="rebuild a run dir from a GPU export (parts + state.json)")
    j.add_argument("export_dir")
    j.add_argument("--init", required=True, help="the init (v1) model dir: tokenizer and generation config")
    j.add_argument("--to", required=True, help="run dir to create (its model/ is the loadable v2)")
    a = p.parse_args(argv)
    try:
        digest = join(Path(a.export_dir), Path(a.init), Path(a.to))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{Path(a.to) / 'model' / 'model.safetensors'} sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
