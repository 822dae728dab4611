"""The Pareto plot of a sweep: perplexity against decode speed and against model size."""

from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[float, float]], more_x_better: bool) -> list[int]:
    """Indices of points no other point beats on both axes (y: lower is better), sorted by x."""
    def beats(a, b):
        x_ok = a[0] >= b[0] if more_x_better else a[0] <= b[0]
        return x_ok and a[1] <= b[1] and a != b
    front = [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = result["rows"]
    speed_rows = [r for r in rows if r["speed"]]
    panels = [("model size (MB, weights in memory)", lambda r: r["model_bytes"] / 1e6, False,
               rows)]
    if speed_rows:
        device = speed_rows[0]["speed"]["device"]
        panels.insert(0, (f"decode speed (tokens/s, batch 1, {device})",
                          lambda r: r["speed"]["decode_tokens_per_s"], True, speed_rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    for ax, (label, x_of, more_x_better, subset) in zip(axes[0], panels):
        points = [(x_of(r), r["perplexity"]) for r in subset]
        front = pareto_front(points, more_x_better)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--",
                color="0.6", zorder=1, label="Pareto front")
        for (x, y), row in zip(points, subset):
            is_base = row["recipe"] == "baseline"
            ax.scatter(x, y, s=160 if is_base else 60, marker="*" if is_base else "o",
                       color="black" if is_base else "tab:blue", zorder=3,
                       label="baseline (uncompressed)" if is_base else None)
            ax.annotate(row["recipe"], (x, y), textcoords="offset points", xytext=(7, 5),
                        fontsize=9)
        ax.scatter([], [], color="tab:blue", s=60, label="compressed (recipe)")
        ax.set_xlabel(label, fontsize=11)
        ax.set_ylabel("perplexity on stdlib evaluation text (lower is better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.12)
        ax.legend(fontsize=9, loc="best")
    fig.suptitle(f"{result['model']}: accuracy against "
                 f"{'speed and ' if speed_rows else ''}size", fontsize=12)
    if speed_rows and device == "cpu":
        fig.text(0.01, 0.01, "cpu: compressed layers run the PyTorch reference (dequantize on "
                 "every call), so they are slower than float32 here; the fused kernels run on "
                 "GPUs.", fontsize=8.5, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
