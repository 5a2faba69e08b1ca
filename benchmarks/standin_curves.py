"""Plot the stand-in v2 run's held-out curves from its metrics JSONL (docs/results/standin_v2_train.jsonl).

    python benchmarks/standin_curves.py docs/results/standin_v2_train.jsonl docs/results/standin_v2_train.png

Panels: held-out book and code NLL; copy-probe NLL at D=256 and D=1984 beside the no-copy NLL of the same
tokens; pass-key and fact accuracy of the in-training monitor (training wordings, few rows: a trend, not the
evaluation, which is docs/results/standin_base.md).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> int:
    with open(src) as fh:
        rows = [json.loads(line) for line in fh]
    held = [r["held_out"] for r in rows if isinstance(r.get("held_out"), dict)]
    if not held:
        print(f"{src}: no held_out records", file=sys.stderr)
        return 1
    step = [h["step"] for h in held]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(step, [h["val_books_nll"] for h in held], label="books (held-out part)")
    ax[0].plot(step, [h["val_code_nll"] for h in held], label="code (held-out files)")
    ax[0].set_title("held-out NLL (nats/token)")
    for d, style in (("256", "-"), ("1984", "--")):
        ax[1].plot(step, [h[f"copy{d}_nll"] for h in held], style, label=f"copy at D={d}")
    ax[1].plot(step, [h["copy256_nocopy_nll"] for h in held], ":", color="grey", label="same tokens, no copy")
    ax[1].set_title("copy probe (nats/token)")
    ax[2].plot(step, [h["passkey_acc"] for h in held], label="pass key (monitor)")
    ax[2].plot(step, [h["fact_acc"] for h in held], label="facts (monitor)")
    ax[2].set_ylim(-0.05, 1.05)
    ax[2].set_title("recall in view (training-time monitor)")
    for a in ax:
        a.set_xlabel("step (131,072 tokens each)")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst} ({len(held)} evaluations)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
