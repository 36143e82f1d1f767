"""DVC stage `pretrain2d`: the 2D text-to-image prior that `train` can repurpose (paper Sec. 6.2).

    python -m stages.pretrain2d --images data/pretrain2d --out models/prior2d

Reads ``params.yaml: pretrain2d`` (images and the optimisation), ``train`` (everything else of the
training loop: model size, text side, noise schedule, caption dropout, ...) and ``atlas.side``
(the image side: a 2D image is shaped like an SD latent, ``[4, side, side]``). Renders captioned
RGBA images of procedural objects that are not the 3D set's (every shape x colour pair, the
held-out ones included; ``gaussian_atlas/pretrain2d.py``), trains the same UNet with 4 channels and
the text encoder on them, and writes the model as a diffusers folder (``<out>/model``) that
``train.model.pretrained`` loads: ``dvc exp run -S train.model.pretrained=models/prior2d/model``
is the paper's *repurposed* arm, ``train.model.pretrained: null`` the *from scratch* one.
Also ``metrics/pretrain2d.json`` and a sheet of the prior's samples (``reports/pretrain2d/samples.png``);
MLflow: params, per-step losses, the sheet.

``pretrain2d.enabled: false`` (the CPU demo, which fine-tunes the shipped ``models/demo-prior``) renders and
trains nothing: the outputs hold a ``SKIPPED.md`` saying so, ``metrics/pretrain2d.json`` the reason, and a
``train`` pointed at ``models/prior2d/model`` fails naming the missing folder. Turn it on for the
transfer experiment: ``dvc exp run -S pretrain2d.enabled=true -S train.model.pretrained=models/prior2d/model``.
"""

from __future__ import annotations

from pathlib import Path

from gaussian_atlas.config import resolve_device
from stages.common import StageError, StageResult, StageRun, main_guard, stage_main

FLAGS = [("--images", "data/pretrain2d", "rendered 2D set"),
         ("--out", "models/prior2d", "checkpoints + model folder"),
         ("--reports", "reports/pretrain2d", "sample sheet folder")]


def prior_train_config(params: dict):
    """The 2D prior's :class:`TrainConfig`: ``train`` with the keys of ``pretrain2d`` (but ``data``) over it,
    4 channels, the atlas side, no rendering losses, previews or snapshots."""
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.train import TrainConfig

    own = {k: v for k, v in (params.get("pretrain2d") or {}).items() if k not in ("data", "enabled")}
    section = {**(params.get("train") or {}), **own}
    model = {**(section.get("model") or {}), "pretrained": None, "channels": 4,
             "sample_size": int(params["atlas"]["side"])}
    section.update(model=model, lambda_rgb=0.0, lambda_mask=0.0, lambda_lpips=0.0, render_every=0, sample_every=0,
                   snapshots=[], sample_prompts=[])
    return from_dict(TrainConfig, section, "params.yaml: pretrain2d over train", complete=True)


def sample_prompts(params: dict, captions: list[str]) -> list[str]:
    """The prior's sample prompts: the 3D set's held-out pairs (which the 2D set does contain; else the first
    caption), filled up to 8 with seen shape x colour pairs."""
    from gaussian_atlas.config import from_dict
    from gaussian_atlas.procedural import COLORS, SHAPES, ProceduralConfig, _caption, _part, holdout_sets

    gen = params.get("generate") or {}
    pcfg = from_dict(ProceduralConfig, {k: v for k, v in gen.items() if k in ("seed", "holdout")})
    held, _ = holdout_sets(pcfg) if pcfg.holdout.singles else ([], [])
    prompts = [_caption([_part(s, c)]) for s, c in held][:8] or [captions[0]]
    return prompts + [_caption([_part(SHAPES[i % len(SHAPES)], c)]) for i, c in enumerate(list(COLORS)[:8 - len(prompts) % 8])]


def body(run: StageRun) -> StageResult:
    from gaussian_atlas import io as gio
    from gaussian_atlas.config import from_dict, to_dict
    from gaussian_atlas.pretrain2d import Prior2dData, image_sheet, load_images, pretrain2d, render_prior_images, sample_images

    args = run.args
    params = run.params()
    data_cfg = from_dict(Prior2dData, (params.get("pretrain2d") or {}).get("data"), "params.yaml: pretrain2d.data", complete=True)
    if int(data_cfg.seed) == int((params.get("generate") or {}).get("seed", 0)):
        raise StageError(f"pretrain2d.data.seed ({data_cfg.seed}) equals generate.seed: the 2D images would show the "
                         "3D training objects themselves; choose another seed")
    cfg = prior_train_config(params)
    side = int(params["atlas"]["side"])
    if not (params.get("pretrain2d") or {}).get("enabled", False):
        reason = ("pretrain2d.enabled is false: no 2D prior was trained (the demo fine-tunes models/demo-prior); set "
                  "it to true to train one, e.g. for the transfer experiment (docs/paper_claims.md)")
        for d in (args.images, args.out, args.reports):
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "SKIPPED.md").write_text(reason + "\n")
        return StageResult({"skipped": reason}, f"pretrain2d: skipped ({reason})")  # no MLflow run
    run.start({**to_dict(cfg), "data": to_dict(data_cfg)})
    rendered = render_prior_images(data_cfg, side, args.images, progress=True)
    images, captions = load_images(args.images)
    t_render = run.elapsed()
    print(f"pretrain2d: {len(images)} images [4, {side}, {side}] of {rendered['n_objects']} objects "
          f"({rendered['n_rendered']} rendered now, {t_render:.1f} s)")
    summary = pretrain2d(cfg, images, captions, args.out, progress=True, log=run.log_step)
    prompts = sample_prompts(params, captions)
    pics = sample_images(Path(args.out) / "model", prompts, list(range(len(prompts))),
                         steps=int(params["train"].get("sample_steps", 20)),
                         guidance=float(params["train"]["sample_guidance"]), device=resolve_device())
    sheet = gio.write_png(Path(args.reports) / "samples.png", image_sheet(pics, prompts, ncols=8))
    metrics = {"n_images": len(images), "n_objects": rendered["n_objects"], "render_seconds": round(t_render, 2),
               **{k: round(v, 6) for k, v in summary.items() if isinstance(v, (int, float))}}
    return StageResult(metrics, f"pretrain2d: {summary['step']} steps, last v-loss "
                       f"{summary.get('last_loss_v', float('nan')):.4f} -> {Path(args.out) / 'model'}; samples in {sheet}",
                       [sheet], mlflow_metrics={"train_seconds": summary["seconds"], "n_images": len(images)})


main = stage_main("pretrain2d", body, doc=__doc__, flags=FLAGS)


if __name__ == "__main__":
    main_guard(main)
