"""The OptDNN scheme driver: one optimisation algorithm unrolled over any residual branches.

A block's residual branch F_k plays the role of the gradient step of a first-order method
(Wu et al., TPAMI 2024). The driver owns the branches and the algorithm's coefficients, so
every backbone (ViT, isotropic ConvNeXt, the MLPs of the toy experiments) shares this code:

    gd    x' = x + F(x)                                      (ResNet / ViT / ConvNeXt)
    hb    x' = x + F(x) + m (x - x_prev)                     (Polyak heavy ball)
    nag   y  = x + m (x - x_prev);   x' = y + F(y)           (Nesterov)
    apg2  y  = (1-t) x + t z;  z' = z + F(y)/t;  x' = y + F(y)   (APG, 2nd form, prox = id)

With every t_k = 1, apg2 computes exactly the gd network (z == x throughout), which is how a
pretrained baseline warm-starts an apg2 model.
"""
from typing import List, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import calculate_drop_path_rates, drop_path

SCHEMES = ("gd", "hb", "nag", "apg2")


def init_coefficients(scheme: str, depth: int) -> torch.Tensor:
    """The algorithm's own schedule: t_k = 2/(k+2) for apg2, m_k = max(0, (k-1)/(k+2)) for hb/nag."""
    k = torch.arange(depth, dtype=torch.float32)
    if scheme == "apg2":
        return 2.0 / (k + 2.0)
    if scheme in ("hb", "nag"):
        return ((k - 1.0) / (k + 2.0)).clamp(min=0.0)
    raise ValueError(f"scheme {scheme!r} has no coefficients; choose one of {SCHEMES}")


class SchemeBlocks(nn.ModuleList):
    """A sequence of residual branches run as the iterations of `scheme`.

    Children are the branches F_k (named 0..L-1, so checkpoints keep the baselines'
    `blocks.N.*` keys); `coef` holds t_k (apg2) or m_k (hb/nag), one learnable scalar per
    block, never weight-decayed. gd has no coefficients (`coef` is an empty, non-persistent
    buffer) so its state dict is exactly the baseline's.
    """

    def __init__(self, branches: Sequence[nn.Module], scheme: str = "apg2",
                 drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__(branches)
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
        depth = len(branches)
        self.scheme = scheme
        # stochastic depth grows linearly with depth (timm's / DeiT's rule); python floats, so meta-device safe
        self.drop_path_rates: List[float] = calculate_drop_path_rates(drop_path_rate, depth)
        self.grad_checkpointing = False
        if scheme == "gd":
            self.register_buffer("coef", torch.ones(0, device=device, dtype=dtype), persistent=False)
        else:
            self.coef = nn.Parameter(init_coefficients(scheme, depth).to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, [], len(self.drop_path_rates))[0]

    def run(self, x: torch.Tensor, keep: List[int], stop: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Iterate blocks 0..stop-1 from x_0 = z_0 = x_{-1} = x; also return x_{k+1} for k in keep."""
        prev = x  # x_{k-1} for hb/nag, z_k for apg2
        kept: List[torch.Tensor] = []
        for k, f in enumerate(self):
            if k < stop:  # TorchScript unrolls this loop and allows no `break`
                c = self.coef[k] if self.scheme != "gd" else None
                y = x  # where the branch is evaluated
                if c is not None and self.scheme == "nag":
                    y = x + c * (x - prev)
                elif c is not None and self.scheme == "apg2":
                    y = x + c * (prev - x)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    fy = checkpoint(f, y, use_reentrant=False)
                else:
                    fy = f(y)
                fy = drop_path(fy, self.drop_path_rates[k], self.training)
                if c is None:
                    x = x + fy
                elif self.scheme == "hb":
                    x, prev = x + fy + c * (x - prev), x
                elif self.scheme == "nag":
                    x, prev = y + fy, x
                else:
                    x, prev = y + fy, prev + fy / c
                if k in keep:
                    kept.append(x)
        return x, kept

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"coef"} if isinstance(self.coef, nn.Parameter) else set()

    def truncate(self, depth: int) -> None:
        """Keep blocks 0..depth-1 only (timm's prune_intermediate_layers)."""
        while len(self) > depth:
            del self[len(self) - 1]
        self.drop_path_rates = self.drop_path_rates[:depth]
        if isinstance(self.coef, nn.Parameter):
            self.coef = nn.Parameter(self.coef.detach()[:depth].clone())

    def coefficients(self) -> List[float]:
        return [float(c) for c in self.coef.detach().cpu()]

    def __repr__(self) -> str:  # ModuleList's repr ignores extra_repr; show what the network learned
        return super().__repr__().replace("(", f"({self.extra_repr()}", 1)

    def extra_repr(self) -> str:
        coefs = ", ".join(f"{c:.3f}" for c in self.coefficients())
        name = {"apg2": "t", "hb": "m", "nag": "m"}.get(self.scheme)
        return f"scheme={self.scheme}" + (f", {name}=[{coefs}]" if name else "")
