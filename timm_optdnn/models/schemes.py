"""The OptDNN scheme driver: one optimisation algorithm unrolled over any residual branches.

A block's residual branch F_k plays the role of a gradient step (Wu et al., TPAMI 2024). The driver owns the branches
and the scheme's coefficients, so every backbone (ViT, isotropic ConvNeXt, the toy MLPs) shares this code. Every
scheme is one update of the state (x_k, y_k), y_k being the extrapolated point (y_0 = x_0, output x_L):

    x_{k+1} = P_k(y_k + F_k(u_k))                       u_k = y_k, or x_k for hb
    y_{k+1} = x_{k+1} + b_k (x_{k+1} - x_k)             b_k learnable, one between blocks k and k+1

    gd    b = 0 (y = x): x' = x + F(x)                  ResNet / ViT / ConvNeXt
    hb    F at x_k: x' = x + F(x) + b (x - x_prev)      Polyak heavy ball
    nag   F at y_k                                      Nesterov
    apg2  F at y_k, P_k an optional prox                accelerated proximal gradient, division-free form

apg2 in its own variables, e_k = y_k - x_k: x' = y + F(y), e' = b (e + F(y)), y' = x' + e'. With P = identity apg2 and
nag are the same network; the prox (`prox="norm"`, experimental) is what sets APG2 apart. b = 0 is gd bit for bit:
the warm start from a pretrained baseline. The b_k start from the algorithm's schedule k/(k+3).
"""
from typing import List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

SCHEMES = ("gd", "hb", "nag", "apg2")
PROXES = ("norm",)


def init_coefficients(scheme: str, depth: int) -> torch.Tensor:
    """The momenta b_0..b_{depth-2} of the algorithm's schedule, b_k = k/(k+3) (Nesterov's; apg2's t_k = 2/(k+2))."""
    if scheme not in SCHEMES or scheme == "gd":
        raise ValueError(f"scheme {scheme!r} has no coefficients; choose one of {SCHEMES[1:]}")
    k = torch.arange(max(depth - 1, 0), dtype=torch.float32)
    return k / (k + 3.0)


def extrapolate(x: torch.Tensor, x1: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y' = x' + b (x' - x) in one kernel, lerp(x, x', 1 + b): lerp's branch for weights >= 0.5 computes
    x' - (x' - x)(1 - w), so b = 0 gives x' exactly."""
    return torch.lerp(x.to(x1.dtype), x1, (1 + b).to(x1.dtype))


def channel_norm(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Layer norm over the channel dimension `dim`, without affine parameters (the prox's normalisation)."""
    v = v.movedim(dim, -1)
    return F.layer_norm(v, v.shape[-1:], eps=1e-6).to(v.dtype).movedim(-1, dim)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one pass: both flattened in b's memory order (views when a is laid out as b is)."""
    order = sorted(range(b.dim()), key=lambda i: b.stride(i), reverse=True)
    return torch.vdot(a.permute(order).reshape(-1), b.permute(order).reshape(-1))


class Step(torch.autograd.Function):
    """x' = y + F, y' = extrapolate(x, x', b) with a hand-written backward, for eager autograd on any device.

    Autograd through the same two ops dispatches 9 full-size ops more than gd's add per block and step; this backward
    runs 3 elementwise ops and one dot: with w = 1 + b and g', g_y' the gradients of x', y',
        g_F = g_y = g' + w g_y',  g_x = (1 - w) g_y',  g_b = <g_y', x' - x>.
    It saves x and x' (x' is the next step's x: one state tensor per block more than gd).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, fy: torch.Tensor, x: torch.Tensor, b: torch.Tensor):
        ctx.set_materialize_grads(False)  # x' often reaches nothing but y' (no zeros for its gradient)
        x1 = y + fy
        ctx.save_for_backward(x, x1, b)
        return x1, extrapolate(x, x1, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_x1: Optional[torch.Tensor], g_y1: Optional[torch.Tensor]):
        x, x1, b = ctx.saved_tensors
        if g_y1 is None:  # y' reached nothing: a branch that ignores its input
            return g_x1, g_x1, None, None
        w = (1 + b).to(g_y1.dtype)
        g = g_y1 * w if g_x1 is None else torch.addcmul(g_x1, g_y1, w)
        return g, g, g_y1 * (1 - w), _dot(g_y1, x1 - x.to(x1.dtype))


class SchemeBlocks(nn.ModuleList):
    """A sequence of residual branches run as the iterations of `scheme`.

    Children are the branches F_k (named 0..L-1, so checkpoints keep the baselines' `blocks.N.*` keys). The learnable
    scheme coefficients are this module's own parameters and nothing else is: `coef` holds b_0..b_{L-2} (hb, nag,
    apg2), `prox_gate` the prox's g_0..g_{L-1}. gd has none (`coef` is an empty, non-persistent buffer), so its state
    dict is exactly the baseline's.

    prox="norm" (apg2 only, experimental): x_{k+1} = P_k(v), v = y_k + F_k, P_k(v) = v + g_k (N(v) - v), N a layer norm
    over `channel_dim` without affine parameters, g_k learnable from 0 (so it starts as the plain scheme, bit for bit).

    In eager autograd the update runs as `Step` (fused=True, the default) or as plain torch ops (fused=False). Under
    torch.compile, TorchScript and tracers it is always the plain ops, which inductor fuses into its neighbours.
    """

    def __init__(self, branches: Sequence[nn.Module], scheme: str = "apg2", prox: Optional[str] = None,
                 channel_dim: int = -1, fused: bool = True, device=None, dtype=None):
        super().__init__(branches)
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
        if prox is not None and (prox not in PROXES or scheme != "apg2"):
            raise ValueError(f"prox={prox!r}: the prox is one of {PROXES}, for scheme 'apg2' only (got {scheme!r})")
        self.scheme = scheme
        self.prox = prox or ""  # a str attribute: TorchScript has no Optional module attributes here
        self.channel_dim = channel_dim
        self.fused = fused
        self.grad_checkpointing = False
        self.depth = depth = len(branches)  # TorchScript has no len() of a ModuleList
        dd = dict(device=device, dtype=dtype)
        self._set("coef", torch.zeros(0, **dd) if scheme == "gd" else init_coefficients(scheme, depth).to(**dd))
        self._set("prox_gate", torch.zeros(depth if prox else 0, **dd))

    def _set(self, name: str, values: torch.Tensor) -> None:
        """Learnable coefficients, or an empty buffer (left out of the state dict) where there is nothing to learn."""
        if hasattr(self, name):
            delattr(self, name)
        if values.numel():
            self.register_parameter(name, nn.Parameter(values))
        else:
            self.register_buffer(name, values, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, [], self.depth)[0]

    def run(self, x: torch.Tensor, keep: List[int], stop: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Iterate blocks 0..stop-1 from x_0 = y_0 = x; also return x_{k+1} for k in keep."""
        y = x
        kept: List[torch.Tensor] = []
        for k, f in enumerate(self):
            if k < stop:  # TorchScript unrolls this loop and allows no `break`
                u = x if self.scheme == "hb" else y
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    fy = checkpoint(f, u, use_reentrant=False)
                else:
                    fy = f(u)
                extrapolates = self.scheme != "gd" and k + 1 < stop
                if extrapolates and not torch.jit.is_scripting() and self._fuses(y):
                    x, y = self._step(y, fy, x, k)
                else:
                    x1 = y + fy
                    if self.prox == "norm":
                        x1 = torch.lerp(x1, channel_norm(x1, self.channel_dim), self.prox_gate[k].to(x1.dtype))
                    y = extrapolate(x, x1, self.coef[k]) if extrapolates else x1
                    x = x1
                if k in keep:
                    kept.append(x)
        return x, kept

    @torch.jit.unused
    def _fuses(self, y: torch.Tensor) -> bool:
        """Whether this step runs as `Step`: eager autograd, the plain scheme (tracers cannot see into a Function)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(y, torch.fx.Proxy):
            return False
        return self.fused and not self.prox and torch.is_grad_enabled()

    @torch.jit.unused
    def _step(self, y: torch.Tensor, fy: torch.Tensor, x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return Step.apply(y, fy, x, self.coef[k])

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {n for n, _ in self.named_parameters(recurse=False)}

    def truncate(self, depth: int) -> None:
        """Keep blocks 0..depth-1 and the coefficients they use (timm's prune_intermediate_layers)."""
        while len(self) > depth:
            del self[len(self) - 1]
        self.depth = len(self)
        for name, n in (("coef", depth - 1), ("prox_gate", depth)):
            values = getattr(self, name)
            if isinstance(values, nn.Parameter):
                self._set(name, values.detach()[:n].clone())

    def coefficients(self) -> List[float]:
        """b_0..b_{L-2}: the learned momenta (empty for gd)."""
        return [float(c) for c in self.coef.detach().cpu()]

    def __repr__(self) -> str:  # ModuleList's repr ignores extra_repr; show what the network learned
        return super().__repr__().replace("(", f"({self.extra_repr()}", 1)

    def extra_repr(self) -> str:
        text = f"scheme={self.scheme}"
        if self.scheme != "gd":
            b = self.coefficients()
            text += f", b=[{', '.join(f'{c:.3f}' for c in b)}] ({sum(c > 1 for c in b)} above 1)"
        if self.prox:
            text += f", prox={self.prox}, g=[{', '.join(f'{float(g):.3f}' for g in self.prox_gate.detach().cpu())}]"
        return text
