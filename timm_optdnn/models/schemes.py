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
import ctypes
from typing import List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from timm.layers import calculate_drop_path_rates, drop_path

from . import _apg2  # after torch: its OpenMP binds to torch's libgomp

_lib = ctypes.CDLL(_apg2.__file__)
_forward, _backward = _lib.apg2_forward, _lib.apg2_backward
_forward.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int]
_backward.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int,
                                               ctypes.POINTER(ctypes.c_double)])
_forward.restype = _backward.restype = None

SCHEMES = ("gd", "hb", "nag", "apg2")


def init_coefficients(scheme: str, depth: int) -> torch.Tensor:
    """The algorithm's own schedule: t_k = 2/(k+2) for apg2, m_k = max(0, (k-1)/(k+2)) for hb/nag."""
    k = torch.arange(depth, dtype=torch.float32)
    if scheme == "apg2":
        return 2.0 / (k + 2.0)
    if scheme in ("hb", "nag"):
        return ((k - 1.0) / (k + 2.0)).clamp(min=0.0)
    raise ValueError(f"scheme {scheme!r} has no coefficients; choose one of {SCHEMES}")


def apg2_step(y: torch.Tensor, fy: torch.Tensor, d: torch.Tensor, t0: torch.Tensor,
              t1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One apg2 iteration in the state (y_k, d_k = z_k - x_k), prox = identity:
    x' = y + F(y), z' = z + F(y)/t0  =>  d' = (1 - t0)(d + F(y)/t0),  y' = x' + t1 d'."""
    d1 = torch.addcdiv(d, fy, t0).mul_(1 - t0)  # fused: these passes over memory are the scheme's whole cost
    return torch.addcmul(y + fy, d1, t1), d1


FUSED = True  # False: the apg2 step always in torch ops (what CUDA and bfloat16 run; the benchmark's --unfused)


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether `_apg2.c` can run the step: float32 CPU tensors of one shape and one dense layout, outside tracers and
    torch.compile (which cannot see into a ctypes call; inductor fuses the torch ops itself)."""
    y = tensors[0]
    return (FUSED and y.device.type == "cpu" and y.dtype == torch.float32
            and (y.is_contiguous() or (y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)))
            and all(t.dtype == y.dtype and t.device == y.device and t.shape == y.shape and t.stride() == y.stride()
                    for t in tensors[1:])
            and not (is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()))


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def fused_forward(y: torch.Tensor, fy: torch.Tensor, d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                  save: bool = False, y_in_place: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`apg2_step` in one pass (`_apg2.c`). d' is written over d, the driver's own state, which nothing else keeps
    (so a block leaves the heap one fresh state tensor, as gd's x + F(x) does, and no hole where d was); with
    `y_in_place`, y' over y too (no autograd or hook may hold y); with `save`, d in bfloat16 is returned for backward."""
    y1 = y if y_in_place else torch.empty_like(y)
    saved = torch.empty_like(d, dtype=torch.bfloat16) if save else None
    _forward(y.data_ptr(), fy.data_ptr(), d.data_ptr(), y1.data_ptr(), d.data_ptr(), _ptr(saved), y.numel(),
             float(t0.detach()), float(t1.detach()), torch.get_num_threads())
    return y1, d, saved


class Apg2Step(torch.autograd.Function):
    """`apg2_step` that saves one half-size tensor (d_k in bfloat16) for backward instead of three full ones.

    F(y_k) is rebuilt in backward from y_k and y_{k+1}, which the branches save anyway (their first
    layer keeps its input):  y' - y = F + t1 (1 - t0)(d + F/t0)  =>  F = (y' - y - t1 (1-t0) d) / (1 + t1 (1-t0)/t0),
    a division by a number >= 1 for t in (0, 1]. d_k itself cannot be rebuilt (going back needs 1/(1 - t_k),
    undefined at t = 1, the warm start). It and the rebuilt F feed only the coefficients' gradients, so a float32
    model keeps d_k in bfloat16: every other gradient is exactly autograd's, and the gradients of the t_k (sums over
    the whole activation) differ from it by ~1e-3 relative. This brings the saved activations of ConvNeXt-iso,
    whose blocks keep ~12 activation-sized tensors, from 1.085x GD to ~1.04x.

    Float32 CPU tensors take the fused kernels of `_apg2.c` both ways; anything else (CUDA, bfloat16, odd layouts)
    the torch ops below, which compute the same.
    """

    @staticmethod
    def forward(ctx, y, fy, d, t0, t1):
        ctx.set_materialize_grads(False)  # the last step's d' is unused: no zeros for its gradient at backward's peak
        ctx.fused = fusable(y, fy, d)
        if ctx.fused:
            y1, d1, saved = fused_forward(y, fy, d, t0, t1, save=True)
            ctx.mark_dirty(d1)
        else:
            y1, d1 = apg2_step(y, fy, d, t0, t1)
            saved = d.to(torch.bfloat16) if d.dtype == torch.float32 else d
        ctx.save_for_backward(y, y1, saved, t0, t1)
        return y1, d1

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y1, g_d1):
        y, y1, d, t0, t1 = ctx.saved_tensors
        if ctx.fused:  # gradients may arrive in the other dense layout (ConvNeXt's head gives NCHW): copy once
            layout = torch.channels_last if y.dim() == 4 and not y.is_contiguous() else torch.contiguous_format
            g_y1 = g_y1.contiguous(memory_format=layout)
            g_d1 = None if g_d1 is None else g_d1.contiguous(memory_format=layout)
        if ctx.fused and fusable(y, g_y1, *([] if g_d1 is None else [g_d1])):
            g_fy = torch.empty_like(y)
            # g_d' is ours alone (d' feeds only the next step), so g_d can take its place
            g_d = None if not ctx.needs_input_grad[2] else torch.empty_like(y) if g_d1 is None else g_d1
            g_t = (ctypes.c_double * 2)()
            _backward(y.data_ptr(), y1.data_ptr(), d.data_ptr(), g_y1.data_ptr(), _ptr(g_d1), g_fy.data_ptr(),
                      _ptr(g_d), y.numel(), float(t0.detach()), float(t1.detach()), torch.get_num_threads(), g_t)
            return g_y1, g_fy, g_d, t0.new_tensor(g_t[0]), t1.new_tensor(g_t[1])
        d = d.to(y.dtype)
        fy = (y1 - y - t1 * (1 - t0) * d) / (1 + t1 * (1 - t0) / t0)
        d1 = (1 - t0) * (d + fy / t0)
        g_d1 = t1 * g_y1 if g_d1 is None else g_d1 + t1 * g_y1  # d' reaches the loss directly and through y'
        g_t0 = -(g_d1 * (d + fy / (t0 * t0))).sum()
        return g_y1, g_y1 + g_d1 * ((1 - t0) / t0), g_d1 * (1 - t0), g_t0, (g_y1 * d1).sum()


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook (global, or on the module or inside it) may hold on to the module's input."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
        sub._forward_hooks or sub._forward_pre_hooks for sub in module.modules())


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
        prev = x  # hb/nag: x_{k-1}
        y = x  # where the branch is evaluated; apg2 carries it (and d = z - x) from step to step
        d = torch.zeros_like(x) if self.scheme == "apg2" else x
        kept: List[torch.Tensor] = []
        for k, f in enumerate(self):
            if k < stop:  # TorchScript unrolls this loop and allows no `break`
                if self.scheme == "nag":
                    y = x + self.coef[k] * (x - prev)
                elif self.scheme != "apg2":
                    y = x
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    fy = checkpoint(f, y, use_reentrant=False)
                else:
                    fy = f(y)
                fy = drop_path(fy, self.drop_path_rates[k], self.training)
                if self.scheme == "gd":
                    x = x + fy
                elif self.scheme == "hb":
                    x, prev = x + fy + self.coef[k] * (x - prev), x
                elif self.scheme == "nag":
                    x, prev = y + fy, x
                else:
                    if k in keep or k + 1 == stop:
                        x = y + fy  # x_{k+1}; only materialised where it is returned
                    if k + 1 < stop:
                        if torch.jit.is_scripting():
                            y, d = apg2_step(y, fy, d, self.coef[k], self.coef[k + 1])
                        else:
                            y, d = self.apg2_step_lean(y, fy, d, self.coef[k], self.coef[k + 1], k)
                if k in keep:
                    kept.append(x)
        return x, kept

    @torch.jit.unused
    def apg2_step_lean(self, y: torch.Tensor, fy: torch.Tensor, d: torch.Tensor, t0: torch.Tensor,
                       t1: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # tracers (fx, fvcore) cannot see into a Function; without autograd there is nothing to save
        if is_fx_symbolic_tracing() or torch.jit.is_tracing():
            return apg2_step(y, fy, d, t0, t1)
        if torch.is_grad_enabled():
            return Apg2Step.apply(y, fy, d, t0, t1)
        if not fusable(y, fy, d):
            return apg2_step(y, fy, d, t0, t1)
        # Inference writes the new state over the old: a block then leaves one fresh tensor, as gd's x + F(x) does,
        # not two (docs/models.md). y_0 is the caller's tensor and a hook on branch k may keep y_k: those are never
        # overwritten. d is the driver's own.
        return fused_forward(y, fy, d, t0, t1, y_in_place=k > 0 and not _hooked(self[k]))[:2]

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
