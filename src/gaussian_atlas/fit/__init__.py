"""3D Gaussian fitting with a bounded count (paper Sec. 3): one loop, two representations.

Per object: Gaussians initialised from mesh surface samples (or random points
in the bounding sphere), SH degree 0 (view-independent colour), loss

    λ_rgb·L1 + λ_ssim·(1 − SSIM) + λ_lpips·LPIPS + λ_reg·mean(scale) [+ λ_mask·L1(alpha)]

optimised with Adam in one loop (:mod:`.loop`), into which a representation plugs:
free Gaussians densified by gsplat's ``DefaultStrategy`` inside the visibility bound
(:mod:`.plain`, ``fit.method: plain``), or the paper's Scaffold-GS anchors with
view-independent MLPs and the rank-averaged bound, baked into Gaussians (:mod:`.anchors`).
Many objects are fitted at once, packed in space (:mod:`.views`).

The λ_mask term (L1 between rendered and reference alpha) is an addition to
the paper's fitting loss: with a white background, white floaters cost nothing
in RGB and white objects would otherwise bleed into the background.

Modules: :mod:`.config` (settings, records, ``CODE_VERSION``), :mod:`.views` (packing,
train / held-out views, initial points), :mod:`.losses`, :mod:`.plain`, :mod:`.anchors`,
:mod:`.loop` (:func:`fit_objects`), :mod:`.store` (reuse keys and the fit stage's chunks on disk).
"""

from .config import CODE_VERSION, METHODS, AnchorConfig, DensifyConfig, FitConfig, FitInput, FitResult
from .loop import fit_objects, out_of_time
from .losses import load_lpips, photometric_loss, psnr, ssim
from .plain import init_gaussians, observed_colors
from .store import config_hash, fit_chunk, fit_outputs, gaussian_stats, input_stamp, is_done, replace_batch
from .views import PackedViews, pack_views, resize_views

__all__ = ["CODE_VERSION", "METHODS", "AnchorConfig", "DensifyConfig", "FitConfig", "FitInput", "FitResult",
           "PackedViews", "config_hash", "fit_chunk", "fit_objects", "fit_outputs", "gaussian_stats",
           "init_gaussians", "input_stamp", "is_done", "load_lpips", "observed_colors", "out_of_time",
           "pack_views", "photometric_loss", "psnr", "replace_batch", "resize_views", "ssim"]
