"""Log a `transfer_run.py` folder into MLflow: one experiment for the claim, one run per arm and seed.

    python benchmarks/log_transfer_run.py docs/paper_claims/transfer_h200 --pictures docs/paper_claims
    mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db   # (or `make ui`): compare the arms' runs

Each arm run gets: the design as parameters (arm, seed, steps, batch, lr, model size, evaluation
settings), every logged training step from ``history.jsonl`` as metrics at its step (v-loss,
rendering losses, learning rate, samples/s), the scores of each checkpoint as metrics at that
step (``generated.seen.both_accuracy``, ``..._ci95_low/high``, ceiling and floor alike), and its
scores tables and sheets as artifacts. A ``prior`` run holds the 2D prior's loss curve and
sample sheet. The pictures of ``--pictures`` (loss plot, Fig. 8 sheet, table) go to every arm run.
Runs of one folder are tagged with it, so a second logging of the same folder is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

EXPERIMENT = "claim-2d-prior-transfer"


def _history(path: Path):
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip():
            row = json.loads(line)
            step = int(row.pop("step"))
            row.pop("time", None)
            yield step, {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def _score_metrics(scores: dict) -> dict[str, float]:
    """``{source: {split: {metric: v, metric_ci95: [lo, hi]}}}`` -> flat MLflow names."""
    out: dict[str, float] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, list) and len(v) == 2 and k.endswith("_ci95") and None not in v:
                out[key + "_low"], out[key + "_high"] = float(v[0]), float(v[1])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)

    walk(scores, "")
    return out


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a transfer_run.py --out folder (arms/<arm>-s<seed>/result.json, ...)")
    ap.add_argument("--pictures", type=Path, default=None, help="report_transfer.py's --docs folder")
    ap.add_argument("--experiment", default=EXPERIMENT,
                    help="MLflow experiment (the layout ablation of issue #14: claim-atlas-layout)")
    args = ap.parse_args(argv)
    import mlflow

    from stages.common import git_commit, setup_mlflow

    arms = sorted(d for d in (args.folder / "arms").glob("*-s*") if (d / "result.json").exists())
    if not arms:
        raise SystemExit(f"{args.folder / 'arms'}: no arm with a result.json; is this a transfer_run.py folder?")
    exp_id = setup_mlflow(args.experiment)
    source = str(args.folder.resolve())
    client = mlflow.MlflowClient()
    if client.search_runs([exp_id], filter_string=f"tags.`gatlas.source` = '{source}'", max_results=1):
        raise SystemExit(f"{source} is already logged in experiment {args.experiment!r}")
    tags = {"gatlas.claim": args.experiment.removeprefix("claim-"), "gatlas.source": source, "mlflow.source.git.commit": git_commit()}
    device = (args.folder / "gpu.txt").read_text().splitlines()[1:2] if (args.folder / "gpu.txt").exists() else []
    if device:
        tags["gatlas.device"] = device[0].split(",")[0]
    run_ids = []
    for d in arms:
        res = json.loads((d / "result.json").read_text())
        a = res["args"]
        layout = res.get("layout", "ot")
        with mlflow.start_run(experiment_id=exp_id, run_name=d.name,
                              tags={**tags, "gatlas.arm": res["arm"], "gatlas.layout": layout}) as run:
            mlflow.log_params({"arm": res["arm"], "seed": res["seed"], "atlas.layout": layout, "steps": a["steps"], "batch": a["batch"],
                               "lr": a["lr"], "warmup": a["warmup"], "size": a["size"], "side": a["side"],
                               "snapshots": ",".join(str(s) for s in res["snapshots"]),
                               "prior": "2D prior, text encoder frozen" if res["arm"] == "repurposed" else "none",
                               "eval_prompts": ",".join(map(str, a["eval_prompts"])),
                               "eval_samples": a["eval_samples"], "eval_views": a["eval_views"],
                               "objects": a["objects"], "holdout": ",".join(map(str, a["holdout"]))})
            n = 0
            for step, m in _history(d / "history.jsonl"):
                mlflow.log_metrics(m, step=step)
                n += 1
            for step, sc in sorted(res["scores"].items(), key=lambda kv: int(kv[0])):
                mlflow.log_metrics(_score_metrics(sc), step=int(step))
            for f in sorted(d.glob("scores_step*.csv")) + sorted(d.glob("sheet_step*.png")):
                mlflow.log_artifact(str(f), artifact_path="scores" if f.suffix == ".csv" else "sheets")
            if args.pictures:
                for f in ("loss.png", "fig8.png", "table.md", "results.json"):
                    if (args.pictures / f).exists():
                        mlflow.log_artifact(str(args.pictures / f), artifact_path="report")
            run_ids.append(run.info.run_id)
            print(f"{d.name}: {n} training steps, {len(res['scores'])} checkpoint(s) -> run {run.info.run_id}")
    if (args.folder / "prior_history.jsonl").exists():
        with mlflow.start_run(experiment_id=exp_id, run_name="prior-2d", tags={**tags, "gatlas.arm": "prior"}) as run:
            prior = json.loads((args.folder / "prior.json").read_text()) if (args.folder / "prior.json").exists() else {}
            mlflow.log_params({k: v for k, v in (prior.get("args") or {}).items() if k.startswith("prior_")})
            for step, m in _history(args.folder / "prior_history.jsonl"):
                mlflow.log_metrics(m, step=step)
            for f in (args.folder / "prior_samples.png", (args.pictures or args.folder) / "prior_samples.png"):
                if f.exists():
                    mlflow.log_artifact(str(f))
                    break
            run_ids.append(run.info.run_id)
    print(f"logged {len(run_ids)} runs into experiment {args.experiment!r}")
    return run_ids


if __name__ == "__main__":
    main()
