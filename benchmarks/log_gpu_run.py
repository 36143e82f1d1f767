"""Log a finished ``gpu_run.py`` folder into the project's MLflow store (the GPU machine has no MLflow).

    python benchmarks/log_gpu_run.py docs/gpu_run            # -> experiment "gaussian-atlas-gpu-run"
    mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db  # (or `make ui`) to look at it

Logs, in one run named after the device: the run's parameters (``summary.json``: fit, atlas and
train configs, timings), every logged training step from ``history.jsonl`` as metrics at its step
(loss terms, learning rate, samples/s, GPU memory), the fit metrics table, the preview sheets
(``previews/step_*.png`` as ``samples/step_*.png``, as the train stage logs them), the final
samples (turntable GIFs, the sheet), a loss plot (written to ``loss.png`` in the folder when
matplotlib is installed) and, when present, the evaluate scores (``evaluate/``). The store is the same as the DVC stages' (``MLFLOW_TRACKING_URI``
overrides it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def plot_loss(history: Path, out: Path) -> bool:
    """Write the loss terms of ``history.jsonl`` against the step to ``out`` (PNG); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return False
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6.6, 3.5), dpi=100)
    for key, label in (("loss_v", "v-prediction MSE"), ("loss_rgb", "rendering L1 (rgb)"), ("loss_mask", "rendering L1 (alpha)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1.2, marker="." if key != "loss_v" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a gpu_run.py --out folder (summary.json, history.jsonl, ...)")
    ap.add_argument("--experiment", default="gaussian-atlas-gpu-run")
    args = ap.parse_args(argv)
    import mlflow

    from gaussian_atlas.config import flatten
    from stages.common import git_commit, setup_mlflow

    folder: Path = args.folder
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        raise SystemExit(f"{summary_path}: missing; is {folder} a gpu_run.py output folder?")
    summary = json.loads(summary_path.read_text())
    exp_id = setup_mlflow(args.experiment)
    name = f"gpu-run {summary.get('device', '?')}"
    with mlflow.start_run(experiment_id=exp_id, run_name=name,
                          tags={"gatlas.stage": "gpu_run", "gatlas.device": summary.get("device", "?"),
                                "mlflow.source.git.commit": git_commit()}) as run:
        params = {k: v for k, v in summary.items() if k not in ("samples",)}
        flat = flatten(params)
        mlflow.log_params({k[:250]: str(v)[:6000] for k, v in flat.items()})
        hist = folder / "history.jsonl"
        n = 0
        if hist.exists():
            for line in hist.read_text().splitlines():
                row = json.loads(line)
                step = int(row.pop("step"))
                row.pop("time", None)
                mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, (int, float))}, step=step)
                n += 1
        if n and plot_loss(hist, folder / "loss.png"):
            mlflow.log_artifact(str(folder / "loss.png"))
        ev = folder / "evaluate" / "evaluate.json"
        if ev.exists():  # the evaluate scores, as the evaluate stage names them (generated.both_accuracy, ...)
            m = json.loads(ev.read_text())
            mlflow.log_metrics({f"{src}.{k}": float(v) for src in ("generated", "ceiling", "floor")
                                for k, v in (m.get(src) or {}).items() if isinstance(v, (int, float))})
        for sub, dest in (("previews", "samples"), ("samples", "final_samples"), ("evaluate", "evaluate")):
            if (folder / sub).is_dir():
                mlflow.log_artifacts(str(folder / sub), artifact_path=dest)
        for f in ("fit_metrics.parquet", "fit_metrics.csv", "summary.json", "run.log", "bench_sample.json"):
            if (folder / f).exists():
                mlflow.log_artifact(str(folder / f))
        print(f"logged {n} training steps and the pictures of {folder} to run {run.info.run_id} "
              f"(experiment {args.experiment})")
        return run.info.run_id


if __name__ == "__main__":
    main()
