"""OptDNN Vision Transformer: DeiT/ViT blocks driven by an optimisation scheme.

The residual branch of block k is the whole pre-norm block minus its identity (the paper's
T(z) = Attn(z) + MLP(z + Attn(z))); the scheme driver (`schemes.SchemeBlocks`) adds the
skip connections. With scheme='gd' this is timm's `VisionTransformer` exactly, and it loads
timm / DeiT checkpoints unchanged; scheme='apg2' loads them too, starting as the baseline.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from timm.models.vision_transformer import global_pool_nlc, init_weights_vit_timm

from .backbone import SchemeBackbone, build_backbone
from .checkpoint import adapt_scheme_state
from .schemes import SchemeBlocks

__all__ = ["OptDNNVisionTransformer"]


class ViTBranch(nn.Module):
    """F(x) = a + dp2(ls2*MLP(LN2(x + a))), a = dp1(ls1*Attn(LN1 x)): timm's Block minus its identity, with its key
    names and its two independent drop-path masks."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, act_layer: Type[nn.Module] = nn.GELU,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return a + self.drop_path2(self.ls2(self.mlp(self.norm2(x + a))))


class OptDNNVisionTransformer(SchemeBackbone):
    """ViT/DeiT with an OptDNN scheme over its blocks; timm's `VisionTransformer` interface and kwargs."""

    stem_group = r"^cls_token|pos_embed|patch_embed"
    pools = ("", "avg", "avgmax", "max", "token")
    output_fmts = ("NCHW", "NLC")

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            init_values: Optional[float] = None,
            class_token: bool = True,
            fc_norm: Optional[bool] = None,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            scheme: str = "apg2",
            prox: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.has_class_token = class_token
        self.check_pool(global_pool)
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = False  # pos_embed covers the class token, as in timm/DeiT ViT

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, **dd)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        self.blocks = SchemeBlocks([
            ViTBranch(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, proj_drop_rate, attn_drop_rate,
                      init_values, dpr, norm_layer, **dd) for dpr in calculate_drop_path_rates(drop_path_rate, depth)
        ], scheme=scheme, prox=prox, **dd)
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction)
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)

    def check_pool(self, global_pool: str) -> None:
        super().check_pool(global_pool)
        if global_pool == "token" and not self.has_class_token:
            raise ValueError("global_pool='token' needs class_token=True")

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"} | super().no_weight_decay()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (with the class token) plus position embedding: the state x_0 the blocks start from."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def format_features(self, features: List[torch.Tensor], img_size: Tuple[int, int], output_fmt: str,
                        return_prefix_tokens: bool = False) -> List[Any]:
        """Patch tokens as NCHW maps (or NLC), optionally with their prefix (class) tokens: timm's ViT convention."""
        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in features]
        features = [y[:, npt:] for y in features]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size(img_size)
            features = [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in features]
        return list(zip(features, prefix_tokens)) if return_prefix_tokens and npt else features

    def prune_head(self) -> None:
        self.fc_norm = nn.Identity()
        super().prune_head()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: OptDNNVisionTransformer) -> Dict[str, torch.Tensor]:
    """timm/DeiT ViT checkpoints (optionally {'model': ...}) -> this model, any scheme.

    timm's ViT filter unwraps, resamples pos-embed / patch-embed for new img/patch sizes;
    `adapt_scheme_state` gives a baseline loaded into another scheme b = 0 (a warm start), converts
    earlier coefficient forms and names every shape mismatch.
    """
    return adapt_scheme_state(vit_checkpoint_filter_fn(state_dict, model), model)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "doi:10.1109/TPAMI.2024.3380007", **kwargs,
    }


# the baseline's weights (timm's DeiT on the Hugging Face hub, with DeiT's preprocessing): the gd twin is that
# network; the apg2 model starts as it (gd-equivalent scheme coefficients), for fine-tuning
default_cfgs = generate_default_cfgs({
    f"optdnn_{scheme}_vit_{size}.{tag}": _cfg(hf_hub_id=f"timm/deit_{deit}_patch16_224.fb_in1k", crop_pct=0.9)
    for size, deit in (("ti", "tiny"), ("s", "small"), ("b", "base"))
    for scheme, tag in (("gd", "fb_in1k"), ("apg2", "fb_in1k_warmstart"))
})
default_cfgs.update(generate_default_cfgs({f"optdnn_vit_{size}": _cfg() for size in ("ti", "s", "b")}))


def _vit(variant: str, pretrained: bool, dims: Dict[str, Any], kwargs: Dict[str, Any]) -> OptDNNVisionTransformer:
    return build_backbone(OptDNNVisionTransformer, variant, pretrained, checkpoint_filter_fn,
                          dict(patch_size=16, **dims), kwargs)


_TI = dict(embed_dim=192, depth=12, num_heads=3)
_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)


@register_model
def optdnn_apg2_vit_ti(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """OptDNN-APG2 ViT-Ti/16 (DeiT-Ti width and depth)."""
    return _vit("optdnn_apg2_vit_ti", pretrained, _TI, kwargs)


@register_model
def optdnn_apg2_vit_s(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """OptDNN-APG2 ViT-S/16 (DeiT-S width and depth)."""
    return _vit("optdnn_apg2_vit_s", pretrained, _S, kwargs)


@register_model
def optdnn_apg2_vit_b(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """OptDNN-APG2 ViT-B/16 (DeiT-B width and depth)."""
    return _vit("optdnn_apg2_vit_b", pretrained, _B, kwargs)


@register_model
def optdnn_gd_vit_ti(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """DeiT-Ti/16 baseline through the scheme driver (gd)."""
    return _vit("optdnn_gd_vit_ti", pretrained, _TI, kwargs)


@register_model
def optdnn_gd_vit_s(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """DeiT-S/16 baseline through the scheme driver (gd)."""
    return _vit("optdnn_gd_vit_s", pretrained, _S, kwargs)


@register_model
def optdnn_gd_vit_b(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """DeiT-B/16 baseline through the scheme driver (gd)."""
    return _vit("optdnn_gd_vit_b", pretrained, _B, kwargs)


@register_model
def optdnn_vit_ti(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """ViT-Ti/16 under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _vit("optdnn_vit_ti", pretrained, _TI, kwargs)


@register_model
def optdnn_vit_s(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """ViT-S/16 under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _vit("optdnn_vit_s", pretrained, _S, kwargs)


@register_model
def optdnn_vit_b(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """ViT-B/16 under any scheme: scheme='gd' | 'hb' | 'nag' | 'apg2' (the default)."""
    return _vit("optdnn_vit_b", pretrained, _B, kwargs)
