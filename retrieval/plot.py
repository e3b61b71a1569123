"""Recall@k curves of an evaluation as a PNG: both directions, index against exact search."""

from __future__ import annotations

from pathlib import Path

from .evaluate import Evaluation

CURVE_K = 100


def plot_recall(evaluation: Evaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, figures, colour in (("text→image", evaluation.text_to_image, "tab:blue"),
                                  ("image→text", evaluation.image_to_text, "tab:orange")):
        curve = figures["curve"]
        ks = range(1, len(curve["exact"]) + 1)
        ax.plot(ks, curve["exact"], color=colour, label=f"{name}, exact")
        ax.plot(ks, curve["index"], color=colour, linestyle="--", label=f"{name}, {evaluation.index_kind} index")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{evaluation.model}: {evaluation.counts['caption_queries']} captions, "
                 f"{evaluation.counts['images']} images", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
