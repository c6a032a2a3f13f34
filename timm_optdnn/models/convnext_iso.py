"""OptDNN isotropic ConvNeXt (Liu et al. 2022, Sec. 3.3) driven by an optimisation scheme.

Keys follow facebookresearch/ConvNeXt's `convnext_isotropic.py`, so its official checkpoints
({'model': state_dict}) load into the gd twin unchanged and warm-start the apg2 model.
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ..pretrained import shipped
from .backbone import SchemeBackbone, build_backbone
from .checkpoint import adapt_scheme_state
from .schemes import SchemeBlocks

__all__ = ["OptDNNConvNeXtIsotropic"]


class ConvNeXtBranch(nn.Module):
    """F(x) = drop_path(gamma * pw2(GELU(pw1(LN(dw7x7(x)))))), NCHW in and out."""

    def __init__(self, dim: int, layer_scale_init_value: float = 0.0, drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, **dd)
        self.norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.pwconv1 = nn.Linear(dim, 4 * dim, **dd)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim, **dd)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value, **dd)) \
            if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        if self.gamma is not None:
            x = self.gamma * x
        return self.drop_path(x.permute(0, 3, 1, 2))


class OptDNNConvNeXtIsotropic(SchemeBackbone):
    """Isotropic ConvNeXt with an OptDNN scheme over its blocks; the official kwargs plus timm's interface."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depth: int = 18,
            dim: int = 384,
            drop_path_rate: float = 0.0,
            layer_scale_init_value: float = 0.0,
            head_init_scale: float = 1.0,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            patch_size: int = 16,
            scheme: str = "apg2",
            prox: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dim
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, **dd)
        self.blocks = SchemeBlocks([ConvNeXtBranch(dim, layer_scale_init_value, dpr, **dd)
                                    for dpr in calculate_drop_path_rates(drop_path_rate, depth)],
                                   scheme=scheme, prox=prox, channel_dim=1, **dd)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, kept channels-last: every branch works over channels (LayerNorm, Linear), so the trunk
        stays NHWC in memory; the scheme's elementwise updates then run on like-strided tensors, not on a
        permuted view, and LayerNorm gets a contiguous input (measured at 224 px, batch 32: train step 16% faster
        for gd and 10% for apg2)."""
        return self.stem(x).contiguous(memory_format=torch.channels_last)

    def norm_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # the final norm acts on channels

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' unpooled NCHW map (channels-last in memory) -> logits: the final norm needs the pooled
        vector, so it lives here."""
        if self.global_pool == "avg":
            x = self.norm(x.mean([-2, -1]))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: OptDNNConvNeXtIsotropic) -> Dict[str, torch.Tensor]:
    """Official isotropic ConvNeXt checkpoints ({'model': ...} or bare) -> this model, any scheme."""
    state_dict = state_dict.get("model", state_dict)
    return adapt_scheme_state(state_dict, model)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem", "classifier": "head", "license": "mit",
        "paper_ids": "doi:10.1109/TPAMI.2024.3380007", **kwargs,
    }


_FMNIST_SHA256 = {  # `make demo` runs published with `optdnn-hub publish --hash-name`
    "apg2": "1d5ea34682298eb6494b0a95c10089b60cd5bd1e50f52801fa3bb35e00c11926",
    "gd": "f5b48a24778bd988fd0224c49206c996d4de9663e572b5c485ce53a9ba9bbacf",
}
# The official isotropic ConvNeXt ImageNet-1k weights (EMA), evaluated by their authors at 224 px with a bicubic
# resize to 256 and a center crop (crop_pct 0.875), ImageNet mean / std. No hash is published for them.
_FB_IN1K = {size: f"https://dl.fbaipublicfiles.com/convnext/convnext_iso_{name}_1k_224_ema.pth"
            for size, name in (("s", "small"), ("b", "base"), ("l", "large"))}

_FM_CFG = dict(num_classes=10, input_size=(3, 28, 28), pool_size=(7, 7), crop_pct=1.0, interpolation="bilinear",
               mean=(0.2860,) * 3, std=(0.3530,) * 3)

default_cfgs = generate_default_cfgs({
    # the baseline's weights: the gd twin is that network; the apg2 model starts as it (gd-equivalent scheme
    # coefficients), for fine-tuning
    **{f"optdnn_{scheme}_convnext_iso_{size}.{tag}": _cfg(url=url)
       for size, url in _FB_IN1K.items() for scheme, tag in (("gd", "fb_in1k"), ("apg2", "fb_in1k_warmstart"))},
    # the Fashion-MNIST demo size (make demo): 28x28 grey stored as RGB, its own mean / std. Its .fmnist weights
    # ship in the package (timm_optdnn/weights/<tag>/, model card and class names beside them)
    **{f"optdnn_{scheme}_convnext_iso_fm.fmnist": _cfg(
        **_FM_CFG, **shipped(f"optdnn_{scheme}_convnext_iso_fm.fmnist", sha))
       for scheme, sha in _FMNIST_SHA256.items()},
})
default_cfgs.update(generate_default_cfgs({  # the scheme-neutral names (no weights)
    **{f"optdnn_convnext_iso_{size}": _cfg() for size in ("s", "b", "l")}, "optdnn_convnext_iso_fm": _cfg(**_FM_CFG)}))


def _convnext_iso(variant: str, pretrained: bool, dims: Dict[str, Any],
                  kwargs: Dict[str, Any]) -> OptDNNConvNeXtIsotropic:
    return build_backbone(OptDNNConvNeXtIsotropic, variant, pretrained, checkpoint_filter_fn, dims, kwargs)


_S = dict(depth=18, dim=384)
_B = dict(depth=18, dim=768)
_L = dict(depth=36, dim=1024)


@register_model
def optdnn_apg2_convnext_iso_s(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """OptDNN-APG2 isotropic ConvNeXt-S (dim 384, depth 18)."""
    return _convnext_iso("optdnn_apg2_convnext_iso_s", pretrained, _S, kwargs)


@register_model
def optdnn_apg2_convnext_iso_b(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """OptDNN-APG2 isotropic ConvNeXt-B (dim 768, depth 18)."""
    return _convnext_iso("optdnn_apg2_convnext_iso_b", pretrained, _B, kwargs)


@register_model
def optdnn_apg2_convnext_iso_l(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """OptDNN-APG2 isotropic ConvNeXt-L (dim 1024, depth 36)."""
    return _convnext_iso("optdnn_apg2_convnext_iso_l", pretrained, _L, kwargs)


@register_model
def optdnn_gd_convnext_iso_s(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """Isotropic ConvNeXt-S baseline through the scheme driver (gd)."""
    return _convnext_iso("optdnn_gd_convnext_iso_s", pretrained, _S, kwargs)


@register_model
def optdnn_gd_convnext_iso_b(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """Isotropic ConvNeXt-B baseline through the scheme driver (gd)."""
    return _convnext_iso("optdnn_gd_convnext_iso_b", pretrained, _B, kwargs)


@register_model
def optdnn_gd_convnext_iso_l(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """Isotropic ConvNeXt-L baseline through the scheme driver (gd)."""
    return _convnext_iso("optdnn_gd_convnext_iso_l", pretrained, _L, kwargs)


@register_model
def optdnn_convnext_iso_s(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """Isotropic ConvNeXt-S under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _convnext_iso("optdnn_convnext_iso_s", pretrained, _S, kwargs)


@register_model
def optdnn_convnext_iso_b(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """Isotropic ConvNeXt-B under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _convnext_iso("optdnn_convnext_iso_b", pretrained, _B, kwargs)


@register_model
def optdnn_convnext_iso_l(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """Isotropic ConvNeXt-L under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _convnext_iso("optdnn_convnext_iso_l", pretrained, _L, kwargs)


_FM = dict(depth=6, dim=64, patch_size=4, num_classes=10)


@register_model
def optdnn_apg2_convnext_iso_fm(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """The demo model: OptDNN-APG2 isotropic ConvNeXt for 28x28 Fashion-MNIST (dim 64, depth 6, patch 4)."""
    return _convnext_iso("optdnn_apg2_convnext_iso_fm", pretrained, _FM, kwargs)


@register_model
def optdnn_gd_convnext_iso_fm(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """The demo model's GD twin (plain isotropic ConvNeXt of the same size)."""
    return _convnext_iso("optdnn_gd_convnext_iso_fm", pretrained, _FM, kwargs)


@register_model
def optdnn_convnext_iso_fm(pretrained: bool = False, **kwargs) -> OptDNNConvNeXtIsotropic:
    """The demo model's size under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _convnext_iso("optdnn_convnext_iso_fm", pretrained, _FM, kwargs)
