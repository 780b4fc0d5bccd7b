"""loss.png: the loss curves as a picture, for people who do not use `dvc plots`."""

from __future__ import annotations

import io
from pathlib import Path

from pipeline import atomic
from pipeline.train.progress import read_log


def write_loss_png(out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = read_log(out_dir / "train_log.tsv")
    val_path = out_dir / "val_log.tsv"
    val = read_log(val_path) if val_path.exists() else []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path, image = out_dir / "loss.png", io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    atomic.write_bytes(path, image.getvalue())
    return path
