"""DVC stage `generate`: render the built-in procedural dataset (the embedded default).

    python -m stages.generate --out data/procedural

Reads ``params.yaml: generate``; writes the NeRF-synthetic layout, captions.jsonl,
``metrics/generate.json`` and a contact sheet; logs all of it to MLflow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stages.common import load_params, main_guard, stage_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/procedural", help="dataset folder to write (default: %(default)s)")
    ap.add_argument("--metrics", default="metrics/generate.json", help="DVC metrics file (default: %(default)s)")
    ap.add_argument("--sheet", default="reports/generate/contact_sheet.png", help="contact sheet PNG")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repo's)")
    args = ap.parse_args(argv)

    import mlflow

    from gaussian_atlas import io as gio
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.procedural import ProceduralConfig, generate_dataset
    from gaussian_atlas.viz import contact_sheet

    cfg = from_dict(ProceduralConfig, load_params("generate", args.params), "params.yaml: generate", complete=True)
    with stage_run("generate", to_dict(cfg)):
        t0 = time.perf_counter()
        summary = generate_dataset(cfg, Path(args.out), progress=True)
        seconds = time.perf_counter() - t0
        metrics = {"n_objects": summary["n_objects"], "n_rendered": summary["n_rendered"],
                   "n_views_total": summary["n_objects"] * cfg.render.views.n_views, "seconds": round(seconds, 2)}
        gio.write_json(args.metrics, metrics)
        mlflow.log_metrics(metrics)
        images, labels = sample_first_views(Path(args.out), limit=32)
        gio.write_png(args.sheet, contact_sheet(images, labels, ncols=8))
        mlflow.log_artifact(args.sheet)
        mlflow.log_artifact(str(Path(args.out) / "captions.jsonl"))
    print(f"generate: {metrics['n_objects']} objects ({metrics['n_rendered']} rendered now) in {seconds:.1f} s "
          f"-> {args.out}")


def sample_first_views(dataset: Path, limit: int = 32) -> tuple[list, list[str]]:
    """First view of up to ``limit`` objects of a NeRF-layout folder, with their captions."""
    import numpy as np
    from PIL import Image

    from gaussian_atlas import io as gio

    images, labels = [], []
    for t in sorted(dataset.glob("**/transforms.json"))[:limit]:
        meta = gio.read_json(t)
        images.append(np.asarray(Image.open(t.parent / meta["frames"][0]["file_path"]).convert("RGBA")))
        obj = t.parent / "object.json"
        labels.append(gio.read_json(obj).get("caption", t.parent.name) if obj.exists() else t.parent.name)
    return images, labels


if __name__ == "__main__":
    main_guard(main)
