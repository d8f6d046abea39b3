"""What the benchmarks share: the CPU's name for their tables, and their charts."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name, thread count and AVX-512 (Linux), for tables and charts."""
    try:
        with open("/proc/cpuinfo") as file:
            cpuinfo = file.read()
    except OSError:
        return platform.processor() or "CPU"
    names = [
        line.split(":", 1)[1].strip()
        for line in cpuinfo.splitlines()
        if line.startswith("model name")
    ]
    avx512 = " with AVX-512" if " avx512f" in cpuinfo else ""
    return f"{names[0]}{avx512}, {len(names)} threads" if names else platform.processor() or "CPU"


def bar_chart(panels, path, title, xlabel):
    """Grouped bars of Gparam/s, one panel per (title, row labels, {name: rates},
    ceiling rates); one color per contender across panels, the ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True
    )
    names = dict.fromkeys(name for _, _, rates, _ in panels for name in rates)
    colors = {name: f"C{k}" for k, name in enumerate(names)}
    for ax, (panel_title, labels, rates, ceiling) in zip(axes[0], panels, strict=True):
        width = 0.8 / len(rates)
        for k, (name, values) in enumerate(rates.items()):
            offsets = [i + (k - len(rates) / 2 + 0.5) * width for i in range(len(labels))]
            ax.bar(offsets, values, width, label=name, color=colors[name])
        for i, rate in enumerate(ceiling):
            label = "ceiling (in-place loop)" if i == 0 else None
            ax.hlines(rate, i - 0.45, i + 0.45, colors="black", linestyles="dashed", label=label)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set(title=panel_title, xlabel=xlabel, ylabel="Gparam/s")
        ax.legend(fontsize="x-small")
    figure.suptitle(f"{title} (Gparam/s, higher is faster); {cpu_name()}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"\nwrote {path}")
