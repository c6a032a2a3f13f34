"""Checkpoint adaptation shared by every backbone: baseline warm start, earlier coefficient forms, named errors."""
import re
from typing import Dict

import torch
import torch.nn as nn

COEF_KEY = "blocks.coef"
GATE_KEY = "blocks.prox_gate"


def _num_blocks(keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def momenta_from_t(t: torch.Tensor) -> torch.Tensor:
    """apg2's earlier coefficients t_0..t_{L-1} (y = (1-t) x + t z, z' = z + F(y)/t, x' = y + F(y)) as the momenta of
    the division-free form, b_k = t_{k+1} (1 - t_k) / t_k for k < L-1: the same network (t_{L-1} was unused)."""
    if not (t > 0).all():
        raise ValueError(f"apg2 coefficients t_k must be positive to convert, got {t.tolist()}")
    t64 = t.double()
    return (t64[1:] * (1 - t64[:-1]) / t64[:-1]).to(t.dtype)


def adapt_scheme_state(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fit a (baseline or OptDNN) state dict to `model`'s scheme, or say exactly why it cannot.

    A checkpoint without scheme coefficients is a baseline (the gd network): loaded into another scheme it gets
    b_k = 0 (and prox gates 0), so the model starts as that baseline and then learns its coefficients. Coefficients
    in an earlier form, one per block, convert: apg2's t_k (`momenta_from_t`), hb's and nag's m_k without m_0 (it
    multiplied x_0 - x_{-1} = 0). Wrong depth or width raises a ValueError naming the mismatch; a classifier that
    timm will re-initialise (num_classes differs from the cfg) is left to timm.
    """
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    expected = model.state_dict()
    depth, found = len(model.blocks), _num_blocks(state)
    if found != depth:
        raise ValueError(f"{name}: checkpoint has {found} blocks, the model has {depth} "
                         f"(pick the model whose depth matches the checkpoint)")
    scheme = model.blocks.scheme
    state = dict(state)
    if scheme != "gd" and COEF_KEY in state and state[COEF_KEY].numel() == depth:
        coef = state[COEF_KEY]
        state[COEF_KEY] = momenta_from_t(coef) if scheme == "apg2" else coef[1:].clone()
    for key, what in ((COEF_KEY, "scheme coefficients"), (GATE_KEY, "prox gates")):
        if key in expected and key not in state:
            state[key] = torch.zeros_like(expected[key], device="cpu")
        elif key in state and key not in expected:
            if state[key].numel() == 0:
                del state[key]  # converted to nothing: a single block has no momentum
            else:
                raise ValueError(f"{name}: checkpoint holds {what} ({key}) that this model (scheme {scheme!r}, "
                                 f"prox {model.blocks.prox or None!r}) does not have; load it into the model it was "
                                 f"trained as (optdnn_<scheme>_*, prox=...)")

    cfg = getattr(model, "pretrained_cfg", {})
    classifier = cfg.get("classifier", "head")
    num_classes = getattr(model, "num_classes", None)
    timm_reinits_head = num_classes != cfg.get("num_classes", num_classes)
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
