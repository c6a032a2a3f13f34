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
from timm.layers import Attention, LayerScale, Mlp, PatchEmbed, trunc_normal_
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from timm.models.vision_transformer import global_pool_nlc, init_weights_vit_timm

from .schemes import SchemeBlocks
from .checkpoint import adapt_scheme_state
from ..pretrained import verified_pretrained

__all__ = ["OptDNNVisionTransformer"]

POOLS = ("", "avg", "avgmax", "max", "token")


class ViTBranch(nn.Module):
    """F(x) = ls1*Attn(LN1 x) + ls2*MLP(LN2(x + ls1*Attn(LN1 x))), with timm's Block key names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ls1(self.attn(self.norm1(x)))
        return a + self.ls2(self.mlp(self.norm2(x + a)))


class OptDNNVisionTransformer(nn.Module):
    """ViT/DeiT with an OptDNN scheme over its blocks; timm's `VisionTransformer` interface and kwargs."""

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
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if global_pool not in POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not one of {POOLS}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = False  # pos_embed covers the class token, as in timm/DeiT ViT
        self.has_class_token = class_token

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, **dd)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        self.blocks = SchemeBlocks([
            ViTBranch(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, proj_drop_rate,
                      attn_drop_rate, init_values, norm_layer, **dd) for _ in range(depth)
        ], scheme=scheme, drop_path_rate=drop_path_rate, **dd)
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

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"} | {f"blocks.{n}" for n in self.blocks.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # scheme coefficients (blocks.coef) match no block and join the last group (lr scale 1)
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def scheme_coefficients(self) -> List[float]:
        """The learned t_k (apg2) or m_k (hb/nag), one per block; empty for gd."""
        return self.blocks.coefficients()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in POOLS or (global_pool == "token" and not self.has_class_token):
                raise ValueError(f"global_pool={global_pool!r} is not possible for this model")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features after each block in `indices` (timm semantics), plus the final features."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._pos_embed(self.patch_embed(x))
        stop = max_index + 1 if stop_early else len(self.blocks)
        x, intermediates = self.blocks.run(x, take_indices, stop)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in intermediates]
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens and npt:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks.truncate(max_index + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: OptDNNVisionTransformer) -> Dict[str, torch.Tensor]:
    """timm/DeiT ViT checkpoints (optionally {'model': ...}) -> this model, any scheme.

    timm's ViT filter unwraps, resamples pos-embed / patch-embed for new img/patch sizes;
    `adapt_scheme_state` adds t_k = 1 for a baseline loaded into apg2 (a warm start) and
    names every shape mismatch.
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


def _vit(variant: str, scheme: str, pretrained: bool, dims: Dict[str, Any],
         kwargs: Dict[str, Any]) -> OptDNNVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        OptDNNVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **verified_pretrained(variant, pretrained, dict(dict(patch_size=16, scheme=scheme, **dims), **kwargs)))


_TI = dict(embed_dim=192, depth=12, num_heads=3)
_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)


@register_model
def optdnn_apg2_vit_ti(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """OptDNN-APG2 ViT-Ti/16 (DeiT-Ti width and depth)."""
    return _vit("optdnn_apg2_vit_ti", "apg2", pretrained, _TI, kwargs)


@register_model
def optdnn_apg2_vit_s(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """OptDNN-APG2 ViT-S/16 (DeiT-S width and depth)."""
    return _vit("optdnn_apg2_vit_s", "apg2", pretrained, _S, kwargs)


@register_model
def optdnn_apg2_vit_b(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """OptDNN-APG2 ViT-B/16 (DeiT-B width and depth)."""
    return _vit("optdnn_apg2_vit_b", "apg2", pretrained, _B, kwargs)


@register_model
def optdnn_gd_vit_ti(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """DeiT-Ti/16 baseline through the scheme driver (gd)."""
    return _vit("optdnn_gd_vit_ti", "gd", pretrained, _TI, kwargs)


@register_model
def optdnn_gd_vit_s(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """DeiT-S/16 baseline through the scheme driver (gd)."""
    return _vit("optdnn_gd_vit_s", "gd", pretrained, _S, kwargs)


@register_model
def optdnn_gd_vit_b(pretrained: bool = False, **kwargs) -> OptDNNVisionTransformer:
    """DeiT-B/16 baseline through the scheme driver (gd)."""
    return _vit("optdnn_gd_vit_b", "gd", pretrained, _B, kwargs)
