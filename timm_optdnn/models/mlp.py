"""OptDNN MLP: the fully connected network of the paper's toy universality experiments.

The state is a `width`-dim vector; block k's residual branch is T_k(z) = W2 s(W1 z + b1) + b2,
exactly the two-layer sub-network the universality theorem asks for (timm's `Mlp`), and the
skip connections come from the same scheme driver as the vision models. Not registered with
timm: it has no image interface, and the experiments build it directly.
"""
from typing import List, Optional, Set, Type

import torch
import torch.nn as nn
from timm.layers import Mlp

from .schemes import SchemeBlocks

__all__ = ["OptDNNMLP"]


class OptDNNMLP(nn.Module):
    """Linear stem in_dim -> width, `depth` two-layer branches under `scheme`, linear head width -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, hidden: int,
                 scheme: str = "apg2", act_layer: Type[nn.Module] = nn.ReLU, prox: Optional[str] = None):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("width", width),
                            ("depth", depth), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"OptDNNMLP: {name} must be a positive integer, got {value!r}")
        self.width, self.hidden = width, hidden
        self.stem = nn.Linear(in_dim, width)
        self.blocks = SchemeBlocks([Mlp(width, hidden, act_layer=act_layer) for _ in range(depth)], scheme=scheme,
                                   prox=prox)
        self.head = nn.Linear(width, out_dim)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {f"blocks.{n}" for n in self.blocks.no_weight_decay()}

    @torch.jit.ignore
    def scheme_coefficients(self) -> List[float]:
        """The learned t_k (apg2) or m_k (hb/nag), one per block; empty for gd."""
        return self.blocks.coefficients()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
