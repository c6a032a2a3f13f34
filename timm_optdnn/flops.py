"""FLOPs and parameter counts of the OptDNN models (or any timm model), with fvcore.

    optdnn-flops                                           # every optdnn_* model at 224
    optdnn-flops optdnn_apg2_vit_s vit_small_patch16_224 --img-size 384 --format json

GFLOPs are fvcore's count, the convention of the published figures (DeiT, ConvNeXt): one multiply-add is one FLOP,
in convolutions, linear layers, matmuls and norms, for one image. fvcore has no handle for
`F.scaled_dot_product_attention` (timm's fused attention) and would silently leave out QK^T and AV (4.25 instead of
4.61 GFLOPs for ViT-S); it is counted here. Elementwise ops (residual adds, GELU, the scheme's updates, pooling) are
left out of the published figures; they are counted apart, in `elem_gflops`, so that the cost the OptDNN schemes add
over their GD twins stays visible instead of vanishing into "ignored ops".
"""
import argparse
import csv
import json
import math
import sys
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore.nn scripts its losses at import, which torch deprecates; we script nothing
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import elementwise_flop_counter, get_shape

import timm_optdnn  # noqa: F401  (registers the optdnn_* models)
from timm_optdnn.models.schemes import SCHEMES

# The equal-width baselines each GD twin reproduces, as published (params in M, GFLOPs at 224): DeiT (Touvron et al.
# 2021) and isotropic ConvNeXt (Liu et al. 2022). DeiT-Ti is published as 1.3 GFLOPs; 1.26 is its unrounded value.
PUBLISHED: Dict[str, Tuple[str, float, float]] = {
    "vit_ti": ("DeiT-Ti", 5.7, 1.26),
    "vit_s": ("DeiT-S", 22.0, 4.6),
    "vit_b": ("DeiT-B", 86.0, 17.6),
    "convnext_iso_s": ("ConvNeXt-S (iso)", 22.0, 4.3),
    "convnext_iso_b": ("ConvNeXt-B (iso)", 87.0, 16.9),
    "convnext_iso_l": ("ConvNeXt-L (iso)", 306.0, 59.7),
}


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """aten::scaled_dot_product_attention(q, k, v, ...): QK^T then AV, one flop per multiply-add."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, n, d = q
    s, dv = k[-2], v[-1]
    return math.prod(batch) * n * s * (d + dv)


def _elementwise(kind: str):
    # one flop per output element (per input element for a reduction), tallied under one key
    scale = (1, 0) if kind == "mean" else (0, 1)
    count = elementwise_flop_counter(*scale)
    return lambda inputs, outputs: {"elementwise": count(inputs, outputs)}


ELEMENTWISE_OPS = ("add", "add_", "sub", "rsub", "mul", "mul_", "div", "addcmul", "addcdiv", "lerp", "gelu", "softmax",
                  "mean")


class FlopCount(NamedTuple):
    model: str
    img_size: int
    mparams: float
    gflops: float  # multiply-adds of conv/linear/matmul/attention/norm: the published convention
    elem_gflops: float  # elementwise ops, left out of `gflops`
    unsupported: Dict[str, int]  # ops fvcore could not count: must be empty for a trustworthy figure

    def baseline(self) -> Optional[Tuple[str, float, float]]:
        """(name, params M, GFLOPs) of the published baseline this optdnn_* model reproduces, if any."""
        return PUBLISHED.get(split_name(self.model)[1])

    def problem(self) -> str:
        """Why this count is incomplete; '' when fvcore counted every op."""
        if not self.unsupported:
            return ""
        opaque = any(op.startswith("prim::PythonOp.") for op in self.unsupported)
        hint = (" (a custom autograd.Function is opaque to the jit trace: run its plain-op form "
                "when torch.jit.is_tracing())") if opaque else ""
        return f"{self.model}: fvcore could not count {self.unsupported}{hint}"


def split_name(name: str) -> Tuple[str, str]:
    """'optdnn_apg2_vit_s' -> ('apg2', 'vit_s'); ('', name) for other models."""
    scheme, _, size = name.removeprefix("optdnn_").partition("_")
    return (scheme, size) if name.startswith("optdnn_") and scheme in SCHEMES else ("", name)


def build(name: str, img_size: int = 224, **create_kwargs: Any) -> nn.Module:
    """timm.create_model(name) in eval mode, at img_size for models with a fixed-size position embedding."""
    if not timm.is_model(name):
        known = ", ".join(timm.list_models("optdnn_*"))
        raise ValueError(f"unknown model {name!r}: not registered with timm (optdnn models: {known})")
    model = timm.create_model(name, **create_kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "strict_img_size", False) and tuple(patch_embed.img_size) != (img_size, img_size):
        model = timm.create_model(name, img_size=img_size, **create_kwargs)  # pos-embed sized for img_size
    return model.eval()


def profile(model_or_name: Union[str, nn.Module], img_size: int = 224, **create_kwargs: Any) -> FlopCount:
    """Params and FLOPs of one forward pass on a (1, C, img_size, img_size) input."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if isinstance(model_or_name, str):
        # weight values do not change the count: build on the meta device, skipping the (slow) init
        model = build(model_or_name, img_size, device="meta", **create_kwargs).to_empty(device="cpu")
        name = model_or_name
    elif create_kwargs:
        raise ValueError(f"create_model kwargs {sorted(create_kwargs)} need a model name, not a built model")
    else:
        name, model = type(model_or_name).__name__, model_or_name
    was_training = model.training
    stride = max((f["reduction"] for f in getattr(model, "feature_info", [])), default=1)
    if img_size < stride:
        raise ValueError(f"img_size={img_size} is smaller than {name}'s {stride}-px patch: no tokens to count")
    x = torch.zeros(1, getattr(model, "in_chans", 3), img_size, img_size)
    analysis = FlopCountAnalysis(model, x)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit,
                           **{f"aten::{op}": _elementwise(op) for op in ELEMENTWISE_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)  # reported in the result
    model.eval()  # no dropout / drop-path in the count; the caller's mode comes back below
    with torch.no_grad():
        total = analysis.total()
    model.train(was_training)
    elem = analysis.by_operator()["elementwise"]
    return FlopCount(name, img_size, sum(p.numel() for p in model.parameters()) / 1e6,
                     (total - elem) / 1e9, elem / 1e9, dict(analysis.unsupported_ops()))


def count(model_or_name: Union[str, nn.Module], img_size: int = 224, **create_kwargs: Any) -> Tuple[float, float]:
    """(GFLOPs, M params) of a model or a timm model name at img_size, in the published convention."""
    c = profile(model_or_name, img_size, **create_kwargs)
    return c.gflops, c.mparams


def default_models() -> List[str]:
    """Every registered optdnn_* model: the published sizes first, each GD twin before its APG2 model."""
    def key(name: str) -> Tuple[int, str, int]:
        scheme, size = split_name(name)
        rank = list(PUBLISHED).index(size) if size in PUBLISHED else len(PUBLISHED)
        return rank, size, SCHEMES.index(scheme) if scheme else len(SCHEMES)
    return sorted(timm.list_models("optdnn_*"), key=key)


def _rows(counts: Sequence[FlopCount]) -> List[Dict[str, Any]]:
    rows = []
    for c in counts:
        base = c.baseline()
        rows.append(dict(model=c.model, img_size=c.img_size, params_m=round(c.mparams, 3),
                         gflops=round(c.gflops, 3), elem_gflops=round(c.elem_gflops, 4),
                         baseline=base[0] if base else "", baseline_params_m=base[1] if base else "",
                         baseline_gflops=base[2] if base else ""))
    return rows


def format_table(counts: Sequence[FlopCount]) -> str:
    """A Markdown table (the one in docs/models.md)."""
    lines = ["| model | img | params (M) | GFLOPs | elementwise GFLOPs | published baseline: params, GFLOPs |",
             "|---|---:|---:|---:|---:|---|"]
    for r in _rows(counts):
        pub = f"{r['baseline']}: {r['baseline_params_m']}M, {r['baseline_gflops']}G" if r["baseline"] else "-"
        lines.append(f"| {r['model']} | {r['img_size']} | {r['params_m']:.2f} | {r['gflops']:.2f} "
                     f"| {r['elem_gflops']:.4f} | {pub} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="optdnn-flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="timm model names (default: every optdnn_* model)")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution in pixels (default 224)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="a Markdown table (default), JSON rows or CSV")
    args = parser.parse_args(argv)
    if args.img_size <= 0:
        parser.error(f"--img-size must be positive, got {args.img_size}")
    try:
        counts = [profile(name, args.img_size) for name in args.models or default_models()]
    except ValueError as e:
        parser.error(str(e))
    for c in counts:
        if c.problem():
            print(f"warning: {c.problem()}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(_rows(counts), indent=1))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(_rows(counts[:1])[0]))
        writer.writeheader()
        writer.writerows(_rows(counts))
    else:
        print(format_table(counts))


if __name__ == "__main__":
    main()
