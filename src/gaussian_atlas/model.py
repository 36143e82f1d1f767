"""The denoiser: a diffusers UNet on 16-channel Gaussian Atlases, and its text side (paper Sec. 5).

Two ways to get a model, both returning ``(unet, text_encoder, tokenizer)``:

- **pretrained** (``ModelConfig.pretrained`` = a local folder or a hub id laid out like a
  Stable Diffusion checkpoint: ``unet/``, ``text_encoder/``, ``tokenizer/``). The UNet's
  ``conv_in`` is widened from 4 to 16 input channels by repeating its weights 4× and
  dividing them by 4 (Marigold's rule: a 16-channel input made of four copies of a latent
  gives exactly the pretrained response), and ``conv_out`` from 4 to 16 output channels by
  repeating weights and bias. The text encoder is frozen.
- **from config** (no weights needed, the embedded default): a UNet of ``size`` "tiny"
  (CPU minutes) or "sd" (the SD-1.5 layout, for GPU benchmarks) with 16 channels in and
  out, a small CLIP text encoder that is trained, and an offline word-level tokenizer
  built from the training captions (``tokenizers`` WordLevel: lower-cased words,
  ``[BOS] ... [EOS]``, ``[UNK]`` for unseen words, padded to ``max_length``).

Hub ids need network access; here only local folders load (``local_files_only``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["ModelConfig", "fast_attention", "compile_unet", "unet_config", "widen_conv_in", "widen_conv_out", "widen_unet", "build_tokenizer",
           "build_text_encoder", "load_model"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
SIZES = ("tiny", "small", "sd")


@dataclass(frozen=True)
class ModelConfig:
    """``params.yaml: train.model``.

    pretrained : local folder / hub id with unet/, text_encoder/, tokenizer/; None = from config.
    size : "tiny" (CPU), "small" (~60M, a GPU run on hundreds of objects) or "sd" (SD-1.5 layout).
    channels : atlas channels (16).
    sample_size : atlas side.
    max_length : text tokens (from-config tokenizer).
    local_files_only : never reach a hub (this workplace has none).
    train_text_encoder : None = trained when built from config, frozen when pretrained (paper).
    """

    pretrained: str | None = None
    size: str = "tiny"
    channels: int = 16
    sample_size: int = 64
    max_length: int = 32
    local_files_only: bool = True
    train_text_encoder: bool | None = None  # None: trained when built from config, frozen when pretrained

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"model.size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.channels % 4:
            raise ValueError(f"model.channels must be a multiple of 4 (conv_in is repeated), got {self.channels}")


def unet_config(size: str, channels: int, sample_size: int, cross_attention_dim: int) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments: "sd" is the SD-1.5 layout, "tiny" a small CPU one."""
    if size == "sd":
        return dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    if size == "small":  # ~60M parameters: a GPU run on a few hundred objects in tens of minutes
        return dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
                    block_out_channels=(128, 256, 512), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    # tiny: attention (self + cross) only at 1/4 resolution, where a 64x64 atlas has 256 tokens;
    # full-resolution attention over 4,096 tokens made a CPU step 8 s instead of well under 1 s.
    return dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
                block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
                attention_head_dim=8, norm_num_groups=8)


@torch.no_grad()
def widen_conv_in(conv: nn.Conv2d, factor: int) -> nn.Conv2d:
    """``[O, I, k, k] -> [O, factor·I, k, k]``: weights repeated ``factor`` times and divided by it."""
    new = nn.Conv2d(conv.in_channels * factor, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None).to(conv.weight)
    new.weight.copy_(conv.weight.repeat(1, factor, 1, 1) / factor)
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


@torch.no_grad()
def widen_conv_out(conv: nn.Conv2d, factor: int) -> nn.Conv2d:
    """``[O, I, k, k] -> [factor·O, I, k, k]``: weights and bias repeated ``factor`` times."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels * factor, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None).to(conv.weight)
    new.weight.copy_(conv.weight.repeat(factor, 1, 1, 1))
    if conv.bias is not None:
        new.bias.copy_(conv.bias.repeat(factor))
    return new


def widen_unet(unet: Any, channels: int) -> Any:
    """Widen a pretrained UNet's ``conv_in``/``conv_out`` to ``channels`` (a multiple of theirs) in place."""
    c_in, c_out = unet.conv_in.in_channels, unet.conv_out.out_channels
    if channels % c_in or channels % c_out:
        raise ValueError(f"cannot widen a {c_in}->{c_out} channel UNet to {channels}: not a multiple")
    if channels != c_in:
        unet.conv_in = widen_conv_in(unet.conv_in, channels // c_in)
    if channels != c_out:
        unet.conv_out = widen_conv_out(unet.conv_out, channels // c_out)
    unet.register_to_config(in_channels=channels, out_channels=channels)
    return unet


def build_tokenizer(captions: Iterable[str], max_length: int = 32) -> Any:
    """An offline word-level tokenizer over the words of ``captions`` (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for c in captions for w, _span in split.pre_tokenize_str(c.lower())})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_length)


def build_text_encoder(tokenizer: Any, size: str = "tiny") -> Any:
    """A CLIP text encoder built from config for ``tokenizer``'s vocabulary (trainable)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden, layers, heads = {"tiny": (64, 2, 2), "small": (256, 4, 4), "sd": (768, 12, 12)}[size]
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(cfg)


def fast_attention(device: Any) -> Any:
    """A context in which ``scaled_dot_product_attention`` prefers cuDNN's fused kernel on Hopper GPUs.

    On sm_90 (H100/H200) cuDNN's attention is faster than the FlashAttention-2 kernel PyTorch
    picks by default, notably at the SD UNet's head size 40 over 16,384 tokens (a 128x128
    atlas); flash / memory-efficient / math stay behind it as fallbacks for inputs cuDNN does
    not take. Elsewhere (CPU, older GPUs): PyTorch's default choice (a null context).
    """
    import contextlib

    dev = torch.device(device)
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (9, 0):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


COMPILE_SCOPES = ("regional", "full")


def compile_unet(unet: Any, scope: str = "regional", mode: str = "default") -> Any:
    """``torch.compile`` a diffusers UNet with static shapes; returns the module to call.

    ``scope="regional"``: each ``ResnetBlock2D`` and ``Transformer2DModel`` is compiled in place
    (``nn.Module.compile``). The UNet's repeated blocks share compiled code (only each distinct
    (block, shape) pair is compiled), so the warm-up is a fraction of a whole-model compile; the
    module keeps its class and state-dict keys. ``scope="full"``: ``torch.compile(unet)``, one graph
    (fusion across blocks too; the longest warm-up); returns the compiled wrapper.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    if scope == "full":
        return torch.compile(unet, mode=mode, dynamic=False)
    import torch._dynamo
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    # every ResnetBlock2D shares one code object, so each (channels, size) variant of the UNet is one more
    # compiled entry of it: the SD layout has ~20 (the default limit of 8 sent the rest back to eager, measured)
    dyn = torch._dynamo.config
    key = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, key, max(getattr(dyn, key), 64))
    for m in unet.modules():
        if isinstance(m, (ResnetBlock2D, Transformer2DModel)):
            m.compile(mode=mode, dynamic=False)
    return unet


def load_model(cfg: ModelConfig, captions: Iterable[str] = ()) -> tuple[Any, Any, Any]:
    """``(unet, text_encoder, tokenizer)`` from a pretrained checkpoint or from config (see the module docstring)."""
    from diffusers import UNet2DConditionModel

    if cfg.pretrained:
        from transformers import AutoTokenizer, CLIPTextModel

        # float32 master weights whatever the files hold (the shipped demo model is fp16; mixed precision is accelerate's)
        kw = {"local_files_only": cfg.local_files_only}
        try:
            unet = UNet2DConditionModel.from_pretrained(cfg.pretrained, subfolder="unet", torch_dtype=torch.float32,
                                                        **kw)
            text_encoder = CLIPTextModel.from_pretrained(cfg.pretrained, subfolder="text_encoder", dtype=torch.float32,
                                                         **kw)
            tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained, subfolder="tokenizer", **kw)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the pretrained model {cfg.pretrained!r} (unet/, text_encoder/, "
                             f"tokenizer/ expected; no hub is reachable here): {exc}") from None
        widen_unet(unet, cfg.channels)
        text_encoder.requires_grad_(bool(cfg.train_text_encoder))  # frozen when pretrained (paper Sec. 6)
        return unet, text_encoder, tokenizer
    tokenizer = build_tokenizer(captions, cfg.max_length)
    text_encoder = build_text_encoder(tokenizer, cfg.size)
    if cfg.train_text_encoder is False:
        text_encoder.requires_grad_(False)
    unet = UNet2DConditionModel(**unet_config(cfg.size, cfg.channels, cfg.sample_size,
                                              text_encoder.config.hidden_size))
    return unet, text_encoder, tokenizer
