"""The timm interface of an isotropic backbone whose trunk is a `SchemeBlocks`, written once for every family.

A family (vit.py, convnext_iso.py) provides `embed` (image -> x_0), `blocks`, `norm`, `head`, `forward_head` and the
few hooks below; this class gives it the rest of timm's model contract: classifier access and reset, gradient
checkpointing, optimizer grouping, weight-decay exclusions, forward_intermediates / prune_intermediate_layers (so
features_only works through timm's FeatureGetterNet) and the learned scheme coefficients.
"""
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from ..pretrained import verified_pretrained
from .schemes import SCHEMES


class SchemeBackbone(nn.Module):
    """Base class of the OptDNN backbones: stem -> SchemeBlocks -> (norm, pool, head)."""

    stem_group = r"^stem"  # group_matcher's regex for the parameters before the blocks
    pools = ("", "avg")  # the global_pool values the head accepts
    output_fmts = ("NCHW",)  # forward_intermediates' formats

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> x_0, the state the blocks start from."""
        raise NotImplementedError

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' output x_L -> forward_features' output (e.g. the final norm)."""
        return x

    def norm_features(self, x: torch.Tensor) -> torch.Tensor:
        """An intermediate feature (a state x_k) under the final norm, for forward_intermediates(norm=True)."""
        return self.norm(x)

    def format_features(self, features: List[torch.Tensor], img_size: Tuple[int, int], output_fmt: str,
                        **kwargs) -> List[Any]:
        """forward_intermediates' states, as the family returns features."""
        return features

    def check_pool(self, global_pool: str) -> None:
        if global_pool not in self.pools:
            raise ValueError(f"global_pool={global_pool!r} is not one of {self.pools} for {type(self).__name__}")

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The scheme coefficients (and, per family, embeddings): never weight-decayed."""
        return {f"blocks.{n}" for n in self.blocks.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # the scheme coefficients join the final norm in the last block's group: under layer decay not the head's
        return dict(stem=self.stem_group, blocks=[(r"^blocks\.(\d+)", None),
                                                  (r"^norm|^blocks\.(?:coef|prox_gate)$", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def scheme_coefficients(self) -> List[float]:
        """The learned momenta b_0..b_{L-2} (empty for gd); the repr of `blocks` also counts those above 1."""
        return self.blocks.coefficients()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.check_pool(global_pool)
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            **kwargs,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """The states after each block in `indices` (timm semantics), plus forward_features' output."""
        if output_fmt not in self.output_fmts:
            raise ValueError(f"output_fmt={output_fmt!r} is not one of {self.output_fmts}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        img_size = (x.shape[-2], x.shape[-1])
        x, states = self.blocks.run(self.embed(x), take_indices, max_index + 1 if stop_early else len(self.blocks))
        features = self.format_features([self.norm_features(s) for s in states] if norm else states,
                                        img_size, output_fmt, **kwargs)
        return features if intermediates_only else (self.finish(x), features)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the blocks (and scheme coefficients) up to the last of `indices`; with prune_norm the final norm goes,
        with prune_head the classifier (and the rest of the head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks.truncate(max_index + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.prune_head()
        return take_indices

    def prune_head(self) -> None:
        self.reset_classifier(0, "")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.blocks(self.embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_backbone(cls: Callable[..., SchemeBackbone], variant: str, pretrained: bool, filter_fn: Callable,
                   defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> SchemeBackbone:
    """timm's builder for `variant` (its size in `defaults`, then the caller's kwargs). A name optdnn_<scheme>_* is
    that scheme's model and refuses another; the scheme-neutral name optdnn_* takes scheme=... (apg2 by default)."""
    named = variant.split("_")[1]
    if named in SCHEMES:
        scheme = kwargs.setdefault("scheme", named)
        if scheme != named:
            neutral = variant.replace(f"_{named}_", "_", 1)
            raise ValueError(f"{variant} is the {named} model and cannot be built with scheme={scheme!r}; "
                             f"for another scheme use {neutral}(scheme={scheme!r})")
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **verified_pretrained(variant, pretrained, {**defaults, **kwargs}))
