"""Plots of the benchmark CSV: ratio to the frozen base and speedup over eager, versus M.

    python -m bench.plot bench/results/lora_linear.csv --out bench/results

One figure per metric; one panel per (shape set, layer) for the rows of one mode of the latest run
(latest date in the file), a line per provider, dtype, rank and dropout over M (a single M is
drawn as a point with its provider's marker). The y axis is logarithmic when a panel's values
span more than a factor of 4 (one slow provider would otherwise flatten the rest); each panel has
its own legend inside it; smoke rows (CPU interpreter runs) carry a "smoke: not performance
figures" mark.
"""
import argparse
import collections
import csv
import os

_MARKERS = "osD^v<>pP*Xh"


def _load(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_csv(path, out_dir, rows=None, mode="fwd+bwd"):
    """Write ratio_to_base.png and speedup_vs_eager.png; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows is None:
        rows = _load(path)
        latest = max(r["date"] for r in rows)
        rows = [r for r in rows if r["date"] == latest]
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return []
    smoke = any(str(r.get("smoke")) == "True" for r in rows)
    panels = collections.OrderedDict()
    for r in rows:
        panels.setdefault((r["set"], r["layer"], int(r["N"]), int(r["K"])), []).append(r)
    providers = sorted({r["provider"] for r in rows})
    marker = {p: _MARKERS[i % len(_MARKERS)] for i, p in enumerate(providers)}
    paths = []
    for metric, label, skip in (("ratio_to_base", "time / frozen base linear", "base"),
                                ("speedup_vs_eager", "speedup over eager (PEFT-style) LoRA", "eager")):
        n = len(panels)
        cols = min(n, 3)
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
        for ax, ((set_name, layer, N, K), rs) in zip(axes.flat, panels.items()):
            lines = collections.defaultdict(list)
            for r in rs:
                if r["provider"] != skip and r[metric] not in ("", "nan") and float(r[metric]) > 0:
                    lines[(r["provider"], r["dtype"], r["r"], r["dropout"])].append((int(r["M"]), float(r[metric])))
            values = [v for pts in lines.values() for _, v in pts if v > 0]
            for (prov, dt, rank, p), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([m for m, _ in pts], [v for _, v in pts], marker=marker[prov], ms=5 if len(pts) == 1 else 3,
                        ls="-" if len(pts) > 1 else "none", lw=2.0 if prov.startswith("fastlora") else 1.0,
                        label=f"{prov} {dt} r{rank} p{p}")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            if values and max(values) / min(values) > 4:
                ax.set_yscale("log", base=2)
            ax.set_title(f"{set_name} {layer} (M x {K} -> {N}), {mode}", fontsize=9)
            ax.set_xlabel("tokens M")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6, loc="best", framealpha=0.8)
            if smoke:
                ax.text(0.5, 0.5, "smoke: not performance figures", transform=ax.transAxes, ha="center",
                        va="center", fontsize=12, color="red", alpha=0.35, rotation=20)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{metric}.png" if mode == "fwd+bwd" else f"{metric}_{mode}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")
    ap.add_argument("--mode", default="fwd+bwd")
    args = ap.parse_args(argv)
    for p in plot_csv(args.csv, args.out or os.path.dirname(os.path.abspath(args.csv)), mode=args.mode):
        print(p)


if __name__ == "__main__":
    main()
