"""Checkpoint adaptation shared by every backbone: baseline warm start and named shape errors."""
import re
from typing import Dict

import torch
import torch.nn as nn

COEF_KEY = "blocks.coef"


def _num_blocks(keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def adapt_scheme_state(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fit a (baseline or OptDNN) state dict to `model`'s scheme, or say exactly why it cannot.

    A checkpoint without scheme coefficients is a baseline (ResNet-like gd network): loaded into
    apg2 it gets t_k = 1, into hb/nag m_k = 0, so the model starts as that baseline and then
    learns its coefficients. Wrong depth or width raises a ValueError naming the mismatch;
    a classifier that timm will re-initialise (num_classes differs from the cfg) is left to timm.
    """
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    expected = model.state_dict()
    depth, found = len(model.blocks), _num_blocks(state)
    if found != depth:
        raise ValueError(f"{name}: checkpoint has {found} blocks, the model has {depth} "
                         f"(pick the model whose depth matches the checkpoint)")
    scheme = model.blocks.scheme
    if COEF_KEY in expected and COEF_KEY not in state:
        state = dict(state)
        state[COEF_KEY] = torch.ones(depth) if scheme == "apg2" else torch.zeros(depth)
    elif COEF_KEY in state and COEF_KEY not in expected:
        raise ValueError(f"{name}: checkpoint holds scheme coefficients ({COEF_KEY}) but the model's "
                         f"scheme is {scheme!r}; load it into the matching optdnn_<scheme>_* model")

    cfg = getattr(model, "pretrained_cfg", {})
    classifier = cfg.get("classifier", "head")
    timm_reinits_head = getattr(model, "num_classes", None) != cfg.get("num_classes", getattr(model, "num_classes", None))
    # timm adapts the first conv to another in_chans after this filter (adapt_input_conv)
    timm_adapts_stem = getattr(model, "in_chans", 3) != cfg.get("input_size", (3,))[0]
    bad = []
    for k, v in state.items():
        if k not in expected or expected[k].shape == v.shape:
            continue
        if (k.startswith(classifier + ".") and timm_reinits_head) or \
                (k.startswith(str(cfg.get("first_conv")) + ".") and timm_adapts_stem):
            continue
        bad.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}")
    if bad:
        hint = ""
        if any(b.startswith(classifier + ".") for b in bad):
            hint = f" (for a different number of classes pass num_classes=N, timm then re-initialises {classifier})"
        raise ValueError(f"{name}: {len(bad)} tensor(s) do not fit: " + "; ".join(bad[:6]) + hint)
    return state
