"""Tables and pictures of a `transfer_run.py` folder (the 2D-prior transfer experiment).

    python benchmarks/report_transfer.py W --docs docs/paper_claims

Reads ``W/arms/<arm>-s<seed>/{result.json, history.jsonl, scores_step<k>.csv, views_step<k>.npz}``
and writes to ``--docs``: ``results.json`` (every number of the table), ``table.md`` (the markdown
table of ``docs/paper_claims.md``), ``loss.png`` (v-loss against the step, per arm and seed),
``fig8.png`` (the paper's Fig. 8 layout: a few seen and held-out prompts, each arm at each
checkpoint), and copies ``W/prior_samples.png``.

Pooling: the scores of every seed of an arm are pooled; a prompt's samples over all seeds are its
group, and the 95 % intervals resample prompts, then samples within a prompt
(:func:`gaussian_atlas.evaluate.bootstrap_ci`). The difference repurposed - scratch is bootstrapped
over prompts (paired: the same prompts in both arms), on each prompt's mean over its samples.

The layout ablation (issue #14: arms ``<arm>-<layout>-s<seed>``) is reported the same way, with each
control layout's paired difference to ``ot`` (``<arm>-ot − <arm>-random``, ``… − <arm>-morton``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METRICS = (("both", "both_correct"), ("colour", "colour_correct"), ("shape", "shape_correct"))
SPLITS = (("seen", False), ("held-out", True))
KINDS = (("all", None), ("singles", "single"), ("stacks", "composition"))


def _arms(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for d in sorted((root / "arms").glob("*-s*")):
        if (d / "result.json").exists():
            out.setdefault(d.name.rsplit("-s", 1)[0], []).append(d)
    return out


def _scores(dirs: list[Path], step: int):
    import pandas as pd

    frames = []
    for d in dirs:
        f = d / f"scores_step{step}.csv"
        if f.exists():
            df = pd.read_csv(f)
            df["run"] = d.name
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def _block(df, held: bool, key: str, n_boot: int = 4000, kind: str | None = None) -> dict:
    from gaussian_atlas.evaluate import bootstrap_ci

    sub = df[(df["held_out"] == held) & df[key].notna() & ((df["kind"] == kind) if kind else True)]
    vals = sub[key].astype(float).to_numpy()
    if not len(vals):
        return {"mean": None, "ci95": None, "n": 0, "n_prompts": 0}
    ci = bootstrap_ci(vals, sub["prompt"].tolist(), n_boot=n_boot, seed=0)
    return {"mean": round(float(vals.mean()), 4), "ci95": list(ci), "n": int(len(vals)),
            "n_prompts": int(sub["prompt"].nunique())}


def _diff(a, b, held: bool, key: str, n_boot: int = 4000) -> dict | None:
    """Mean of (a - b) over prompts, each prompt's mean over its samples; paired bootstrap over prompts."""
    pa = a[(a["held_out"] == held) & a[key].notna()].groupby("prompt")[key].mean()
    pb = b[(b["held_out"] == held) & b[key].notna()].groupby("prompt")[key].mean()
    common = sorted(set(pa.index) & set(pb.index))
    if not common:
        return None
    from gaussian_atlas.evaluate import bootstrap_ci

    d = (pa[common] - pb[common]).to_numpy(dtype=float)
    lo, hi = bootstrap_ci(d, common, n_boot=n_boot, seed=0)  # each prompt its own group: resampled prompts
    return {"mean": round(float(d.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "n_prompts": len(common)}


def _pairs(arms) -> list[tuple[str, str]]:
    """(a, b) pairs whose difference a - b is reported: the 2D prior's (repurposed - scratch, per layout)
    and the layout ablation's (<arm>-ot - <arm>-<control>)."""
    pairs = [(a, b) for a, b in (("repurposed", "scratch"), ("repurposed-ot", "scratch-ot")) if a in arms and b in arms]
    for base in ("repurposed", "scratch"):
        for control in ("random", "morton"):
            if f"{base}-ot" in arms and f"{base}-{control}" in arms:
                pairs.append((f"{base}-ot", f"{base}-{control}"))
    return pairs


def _vloss(hist: Path, step: int) -> float | None:
    rows = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()] if hist.exists() else []
    vals = [r["loss_v"] for r in rows if 0.9 * step < r["step"] <= step and "loss_v" in r]
    return round(float(np.mean(vals)), 4) if vals else None


def _fmt(b: dict | None) -> str:
    if not b or b.get("mean") is None:
        return "–"
    return f"{b['mean']:.2f} [{b['ci95'][0]:.2f}, {b['ci95'][1]:.2f}]"


def report(root: Path, docs: Path) -> dict:
    docs.mkdir(parents=True, exist_ok=True)
    arms = _arms(root)
    if not arms:
        raise SystemExit(f"{root / 'arms'}: no finished arm (result.json)")
    first = json.loads(next(iter(arms.values()))[0].joinpath("result.json").read_text())
    steps = sorted(int(k) for k in first["scores"])
    results: dict = {"arms": {}, "reference": {}, "difference": {}, "design": {
        "steps": first["args"]["steps"], "snapshots": steps, "batch": first["args"]["batch"],
        "lr": first["args"]["lr"], "size": first["args"]["size"], "side": first["args"]["side"],
        "seeds": {a: [d.name for d in ds] for a, ds in arms.items()},
        "eval": first["evaluate_config"]}}
    for arm, dirs in arms.items():
        for step in steps:
            df = _scores(dirs, step)
            if df is None:
                continue
            gen = df[df["source"] == "generated"]
            row = {split: {m: _block(gen, held, key) for m, key in METRICS} for split, held in SPLITS}
            row["by_kind"] = {f"{split} {kname}": _block(gen, held, "both_correct", kind=kind)
                              for split, held in SPLITS for kname, kind in KINDS[1:]}
            losses = [_vloss(d / "history.jsonl", step) for d in dirs]
            row["v_loss"] = [v for v in losses if v is not None]
            row["n_runs"] = int(gen["run"].nunique())
            results["arms"].setdefault(arm, {})[step] = row
            if step == steps[-1] and not results["reference"]:
                for src in ("ceiling", "floor"):
                    ref = df[(df["source"] == src) & (df["run"] == dirs[0].name)]
                    results["reference"][src] = {split: {m: _block(ref, held, key) for m, key in METRICS}
                                                 for split, held in SPLITS}
                    results["reference"][src]["by_kind"] = {
                        f"{split} {kname}": _block(ref, held, "both_correct", kind=kind)
                        for split, held in SPLITS for kname, kind in KINDS[1:]}
    results["differences"] = {}
    for pa, pb in _pairs(arms):
        label = f"{pa} − {pb}"
        for step in steps:
            a, b = _scores(arms[pa], step), _scores(arms[pb], step)
            if a is None or b is None:
                continue
            a, b = a[a["source"] == "generated"], b[b["source"] == "generated"]
            results["differences"].setdefault(label, {})[step] = {
                split: {m: _diff(a, b, held, key) for m, key in METRICS} for split, held in SPLITS}
    results["difference"] = results["differences"].get("repurposed − scratch", {})  # the transfer claim's
    layouts = {}
    for arm, dirs in arms.items():
        r = json.loads(dirs[0].joinpath("result.json").read_text())
        layouts[arm] = r.get("layout", "ot")
    results["design"]["layouts"] = layouts
    if (root / "data.json").exists():
        results["design"]["layout_coherence"] = json.loads((root / "data.json").read_text()).get("layouts")
    (docs / "results.json").write_text(json.dumps(results, indent=1))

    lines = ["| arm | step | v-loss | seen: both right | held-out: both right | seen: colour | held-out: colour | "
             "seen: shape | held-out: shape |", "|---|---:|---:|---|---|---|---|---|---|"]
    for arm in _order(arms):
        for step, r in sorted((results["arms"].get(arm) or {}).items()):
            vl = ", ".join(f"{v:.3f}" for v in r["v_loss"]) or "–"
            lines.append(f"| {arm} ({r['n_runs']} seed{'s' if r['n_runs'] > 1 else ''}) | {step} | {vl} | "
                         f"{_fmt(r['seen']['both'])} | {_fmt(r['held-out']['both'])} | {_fmt(r['seen']['colour'])} | "
                         f"{_fmt(r['held-out']['colour'])} | {_fmt(r['seen']['shape'])} | {_fmt(r['held-out']['shape'])} |")
    for src, r in results["reference"].items():
        lines.append(f"| {src} | – | – | {_fmt(r['seen']['both'])} | {_fmt(r['held-out']['both'])} | "
                     f"{_fmt(r['seen']['colour'])} | {_fmt(r['held-out']['colour'])} | {_fmt(r['seen']['shape'])} | "
                     f"{_fmt(r['held-out']['shape'])} |")
    for label, step, r in [(lb, st, r) for lb, d in results["differences"].items() for st, r in sorted(d.items())]:
        lines.append(f"| {label} | {step} | – | {_fmt(r['seen']['both'])} | {_fmt(r['held-out']['both'])} | "
                     f"{_fmt(r['seen']['colour'])} | {_fmt(r['held-out']['colour'])} | {_fmt(r['seen']['shape'])} | "
                     f"{_fmt(r['held-out']['shape'])} |")
    kinds = [f"{split} {k}" for split, _ in SPLITS for k, _ in KINDS[1:]]
    lines += ["", "Both right, by prompt kind (95 % CI):", "",
              "| arm | step | " + " | ".join(kinds) + " |", "|---|---:|" + "---|" * len(kinds)]
    for arm in _order(results["arms"]):
        for step, r in sorted(results["arms"][arm].items()):
            lines.append(f"| {arm} | {step} | " + " | ".join(
                f"{_fmt(r['by_kind'][k])} (n={r['by_kind'][k]['n']})" for k in kinds) + " |")
    for src, r in results["reference"].items():
        lines.append(f"| {src} | – | " + " | ".join(_fmt(r["by_kind"][k]) for k in kinds) + " |")
    table = "\n".join(lines) + "\n"
    (docs / "table.md").write_text(table)
    print(table)
    _plot_loss(arms, docs / "loss.png")
    _fig8(root, arms, steps, first, docs / "fig8.png")
    if (root / "prior_samples.png").exists():
        shutil.copy2(root / "prior_samples.png", docs / "prior_samples.png")
    return results


def _order(arms) -> list[str]:
    """scratch before repurposed, and ot, random, morton within each."""
    rank = {"scratch": 0, "repurposed": 1, "ot": 0, "random": 1, "morton": 2}
    return sorted(arms, key=lambda a: tuple(rank.get(p, 9) for p in a.split("-")) + (a,))


def _plot_loss(arms: dict[str, list[Path]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return
    fig, ax = plt.subplots(figsize=(6.6, 3.6), dpi=100)
    colours = {"scratch": "tab:red", "repurposed": "tab:blue", "repurposed-ot": "tab:blue", "scratch-ot": "tab:red",
               "repurposed-random": "tab:cyan", "scratch-random": "tab:orange", "repurposed-morton": "tab:purple",
               "scratch-morton": "tab:brown"}
    for arm in _order(arms):
        dirs = arms[arm]
        for k, d in enumerate(dirs):
            rows = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines() if x.strip()]
            pts = np.array([(r["step"], r["loss_v"]) for r in rows if "loss_v" in r])
            if len(pts):
                ax.plot(pts[:, 0], pts[:, 1], color=colours.get(arm), lw=1.0, alpha=0.85,
                        ls="-" if k == 0 else "--", label=f"{arm} ({d.name.rsplit('-', 1)[1]})")
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction MSE (logged every 25 steps)")
    ax.set_title("Training loss per arm" if any("-" in a for a in arms) else
                 "From scratch vs repurposed 2D prior: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _fig8(root: Path, arms: dict[str, list[Path]], steps: list[int], first: dict, out: Path, per_split: int = 3) -> None:
    """Rows: 3 seen and 3 held-out single prompts; columns: each arm (seed of its first run) at each step."""
    from gaussian_atlas import io as gio
    from gaussian_atlas.viz import contact_sheet

    prompts = first["prompts"]
    pick = ([i for i, p in enumerate(prompts) if p["kind"] == "single" and not p["held_out"]][:per_split]
            + [i for i, p in enumerate(prompts) if p["kind"] == "single" and p["held_out"]][:per_split])
    order = _order(arms)
    if len(order) > 2:  # the layout ablation: every arm at its last checkpoint
        steps = steps[-1:]
    tiles, labels = [], []
    for i in pick:
        for arm in order:
            for step in steps:
                f = arms[arm][0] / f"views_step{step}.npz"
                if not f.exists():
                    tiles.append(np.full((64, 64, 3), 255, np.uint8))
                else:
                    with np.load(f) as z:
                        tiles.append(z["views"][i, 0])
                tag = "[held out] " if prompts[i]["held_out"] else ""
                labels.append(f"{arm} @{step}: {tag}{prompts[i]['prompt']}")
    if tiles:
        gio.write_png(out, contact_sheet(tiles, labels, ncols=len(order) * len(steps), tile=128))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a transfer_run.py --out folder")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "paper_claims")
    args = ap.parse_args()
    report(args.root, args.docs)


if __name__ == "__main__":
    main()
