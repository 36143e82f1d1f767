"""How small the fit's Gaussians get over a paper-scale schedule, with and without the floor ``fit.min_scale``.

    python benchmarks/bench_scale_floor.py --json docs/bench/scale_floor_cpu.json          # CPU, ~13 min per arm
    python benchmarks/bench_scale_floor.py --device cuda --resolution 256 --views 32 --objects 8 --json ...

The first ``--objects`` procedural objects (the generator of the ``generate`` stage, ``--resolution`` px,
``--views`` views, every 8th held out) are fitted together as one packed batch per arm with bench_data_e2e's
paper-scale keys (1,500 steps, 4 views per step, τ 36,864, densification every 100 steps from 100 to 1,200) and
the rest of ``params.yaml: fit``. Arms (``--arms``, ``name:overrides;...`` in bench_fit ``--variants`` syntax):
``free`` (``min_scale=1e-30``: no floor), ``floor`` (``params.yaml``'s ``min_scale``), ``free_seed1`` (no floor,
another seed: how far two fits differ without any change of settings). Recorded per arm: the smallest log-scale of
the batch every ``--every`` steps (after the step, the strategy and the floor), and per object the held-out PSNR,
the smallest log-scale and the Gaussian count; the JSON also holds machine, versions, commit and command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "src"), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _overrides import parse_overrides, with_overrides  # noqa: E402
from _record import write_record  # noqa: E402

ARMS = "free:min_scale=1e-30;floor:;free_seed1:min_scale=1e-30,seed=1"


def main() -> None:
    import torch

    import bench_data_e2e as e2e
    from gaussian_atlas.data import load_object
    from gaussian_atlas.fit import FitInput, fit_objects
    from gaussian_atlas.fit.plain import PlainFit
    from gaussian_atlas.procedural import _render_one, _up_to_date, object_specs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--first", type=int, default=0, help="index of the first procedural object")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--arms", default=ARMS)
    ap.add_argument("--every", type=int, default=50, help="record the smallest log-scale every this many steps")
    ap.add_argument("--data", default=None, help="render folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = Path(args.data or tempfile.mkdtemp(prefix="scale_floor_"))
    cfgs = e2e.configs(e2e.parser().parse_args(["--device", args.device, "--steps", str(args.steps), "--resolution",
                                                str(args.resolution), "--views", str(args.views),
                                                "--objects", str(args.first + args.objects), "--out", str(data)]), data)
    specs = object_specs(cfgs["procedural"])[args.first:args.first + args.objects]
    objects = []
    for spec in specs:
        folder = data / spec["id"]
        if not _up_to_date(folder, spec, cfgs["procedural"].render):
            _render_one(spec, str(folder), cfgs["procedural"].render)
        objects.append(FitInput.from_loaded(spec["id"], load_object(folder)))

    trajectory: list[dict] = []
    orig = PlainFit.stats

    def stats(self):  # called by the loop after every step when on_step is given
        trajectory.append(float(self.params["scales"].detach().min()))
        return orig(self)

    PlainFit.stats = stats
    rows = []
    for arm in (a for a in args.arms.split(";") if a.strip()):
        name, _, overrides = arm.partition(":")
        cfg = with_overrides(cfgs["fit"], parse_overrides(overrides), f"arm {name}")
        trajectory.clear()
        t = time.perf_counter()
        res = fit_objects(objects, cfg, device=args.device, on_step=lambda s, m: None)
        seconds = time.perf_counter() - t
        row = {"arm": name, "overrides": overrides, "min_scale": cfg.min_scale, "seed": cfg.seed, "seconds": seconds,
               "log_scale_min_every": {str(s): trajectory[s] for s in range(0, len(trajectory), args.every)}
               | {str(len(trajectory) - 1): trajectory[-1]},
               "objects": [{"id": r.id, "caption": sp["caption"], "psnr": r.metrics["psnr"],
                            "n_gaussians": r.metrics["n_gaussians"],
                            "log_scale_min": float(r.gaussians.log_scales.min())} for r, sp in zip(res, specs)]}
        rows.append(row)
        print(f"{name:12s} ({overrides or 'params.yaml'}): {seconds:.0f} s; smallest log-scale "
              + ", ".join(f"step {s}: {v:.2f}" for s, v in list(row["log_scale_min_every"].items())[::6])
              + " | " + ", ".join(f"{o['id']} {o['psnr']:.2f} dB (min log-scale {o['log_scale_min']:.2f})"
                                  for o in row["objects"]), flush=True)
        write_record(args.json, {"benchmark": "bench_scale_floor", "device": args.device, "steps": args.steps,
                                 "resolution": args.resolution, "views": args.views, "arms": rows})
    PlainFit.stats = orig


if __name__ == "__main__":
    main()
