"""CLIP and VQA scores of rendered views, from weights on disk only (otherwise recorded as skipped).

CLIP score (weights on disk only)
    ``100 * max(cos(image, text), 0)`` per view (the torchmetrics ``CLIPScore``
    convention), averaged over the views of a prompt, then over prompts. The model is
    whatever CLIP folder ``clip_model`` names (transformers ``CLIPModel`` layout; the
    usual choice is openai/clip-vit-large-patch14 downloaded beforehand), loaded with
    ``local_files_only``. No folder -> ``{"status": "skipped", "reason": ...}``.

VQA score (weights on disk only)
    CLIP-FlanT5 VQAScore through ``t2v_metrics`` (P("Yes") to "Does this figure show
    '<prompt>'?"), averaged like the CLIP score. ``t2v_metrics`` pins torch 2.5.1 and
    transformers 4.49, which this project's environment does not have: it is used when it
    imports (an environment built for it) and the weights folder exists, otherwise recorded
    as skipped with the reason; never a number from a random network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def skipped(reason: str) -> dict[str, str]:
    return {"status": "skipped", "reason": reason}


def _weights_problem(path: str | None, key: str) -> str | None:
    if not path:
        return f"no weights configured (evaluate.{key} is null)"
    if not Path(path).is_dir():
        return f"no weights at {path}"
    return None


@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and image processor, loaded from a local folder (:func:`load_clip`)."""

    model: Any
    tokenizer: Any
    processor: Any
    path: str
    device: torch.device

    @torch.no_grad()
    def __call__(self, views: np.ndarray, prompts: Sequence[str], batch: int = 32) -> np.ndarray:
        """``[B]`` CLIP scores of uint8 views ``[B, V, H, W, 3]`` against ``prompts [B]``.

        ``100 * max(cos(image, text), 0)`` per view (torchmetrics ``CLIPScore``), mean over the views.
        """
        views = np.asarray(views)
        B, V = views.shape[:2]
        if B != len(prompts):
            raise ValueError(f"{B} objects but {len(prompts)} prompts")
        if B == 0:
            return np.zeros(0)
        cfg = self.model.config.text_config
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), cfg.max_position_embeddings)
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="pt")
        kw = {"input_ids": enc["input_ids"].to(self.device)}
        if enc.get("attention_mask") is not None:
            kw["attention_mask"] = enc["attention_mask"].to(self.device)
        t = self.model.get_text_features(**kw)
        t = torch.nn.functional.normalize(getattr(t, "pooler_output", t).float(), dim=-1)  # [B, D]
        flat = views.reshape(B * V, *views.shape[2:])
        feats = []
        for i in range(0, len(flat), batch):
            px = self.processor(images=list(flat[i:i + batch]), return_tensors="pt")["pixel_values"]
            f = self.model.get_image_features(pixel_values=px.to(self.device))
            feats.append(torch.nn.functional.normalize(getattr(f, "pooler_output", f).float(), dim=-1))
        img = torch.cat(feats).reshape(B, V, -1)  # [B, V, D]
        return (100.0 * (img * t[:, None]).sum(-1).clamp_min(0.0)).mean(1).cpu().numpy()


def load_clip(path: str | None, device: str | torch.device = "cpu") -> ClipScorer | dict[str, str]:
    """A :class:`ClipScorer` from the local folder ``path`` (``CLIPModel`` + tokenizer + image processor,
    ``local_files_only``), or :func:`skipped` with the reason when ``path`` is None or not a folder.

    Raises ``ValueError`` naming the folder when it exists but does not load.
    """
    problem = _weights_problem(path, "clip_model")
    if problem:
        return skipped(problem)
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load CLIP from {path} (CLIPModel weights, a tokenizer and an image processor "
                         f"expected): {exc}") from None
    return ClipScorer(model=model, tokenizer=tok, processor=proc, path=str(path), device=torch.device(device))


@dataclass
class VqaScorer:
    """VQAScore through ``t2v_metrics`` (:func:`load_vqa`)."""

    scorer: Any
    name: str
    path: str

    def __call__(self, views: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """``[B]`` mean VQAScore (P("Yes"), in [0, 1]) over the views ``[B, V, H, W, 3]`` of each prompt."""
        import tempfile

        from PIL import Image

        out = []
        with tempfile.TemporaryDirectory(prefix="gatlas-vqa-") as tmp:
            for b, (v, p) in enumerate(zip(np.asarray(views), prompts)):
                paths = []
                for k, im in enumerate(v):
                    paths.append(str(Path(tmp) / f"{b:04d}-{k:02d}.png"))
                    Image.fromarray(im).save(paths[-1])
                out.append(float(self.scorer(images=paths, texts=[p]).float().mean()))
        return np.asarray(out)


def load_vqa(path: str | None, name: str = "clip-flant5-xxl", device: str | torch.device = "cpu") -> VqaScorer | dict[str, str]:
    """A :class:`VqaScorer` (``t2v_metrics.VQAScore(name, cache_dir=path)``), or :func:`skipped` with the reason.

    Skipped when ``path`` is None / not a folder, or when ``t2v_metrics`` does not import:
    it pins torch 2.5.1 and transformers 4.49, which this project's environment does not
    have, so it is not a dependency and this path is not exercised by the tests.
    """
    problem = _weights_problem(path, "vqa_model")
    if problem:
        return skipped(f"VQA score needs t2v_metrics + {name} weights: {problem}")
    try:
        import t2v_metrics  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or its import-time ffmpeg check
        return skipped(f"t2v_metrics is not usable here ({type(exc).__name__}: {exc}); it pins torch==2.5.1 and "
                       f"transformers==4.49.0, so it needs an environment of its own")
    return VqaScorer(scorer=t2v_metrics.VQAScore(model=name, device=str(device), cache_dir=str(path)), name=name,
                     path=str(path))
