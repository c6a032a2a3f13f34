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
import math
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils.checkpoint import checkpoint
from timm.layers import calculate_drop_path_rates, drop_path

from . import _apg2  # after torch: its OpenMP binds to torch's libgomp

_lib = ctypes.CDLL(_apg2.__file__)
_forward, _rebuild, _backward = _lib.apg2_forward, _lib.apg2_rebuild, _lib.apg2_backward
_SIZES = [ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int]  # n, t0, t1, threads
_forward.argtypes = [ctypes.c_void_p] * 5 + _SIZES
_rebuild.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                     ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_int]
_backward.argtypes = [ctypes.c_void_p] * 7 + _SIZES + [ctypes.POINTER(ctypes.c_double)]
_forward.restype = _rebuild.restype = _backward.restype = None

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


def next_d(d: torch.Tensor, fy: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
    """d' = (1 - t0)(d + F(y)/t0), out of place (`apg2_step` fuses it in place for the driver)."""
    return (1 - t0) * (d + fy / t0)


def rebuilt_f(y: torch.Tensor, y1: torch.Tensor, d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """F(y) from y, y' and d: y' - y = F + t1 (1 - t0)(d + F/t0), a division by 1 + t1 (1 - t0)/t0 >= 1 for t in (0, 1]."""
    return (y1 - y - t1 * (1 - t0) * d) / (1 + t1 * (1 - t0) / t0)


FUSED = True  # False: the apg2 step always in torch ops (what CUDA and bfloat16 run; the benchmark's --unfused)


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether `_apg2.c` can run the step: float32 CPU tensors of one shape and one dense layout, outside tracers and
    torch.compile (which cannot see into a ctypes call; inductor fuses the torch ops itself)."""
    if not FUSED or is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # first: fx's proxies cannot answer the questions below
    y = tensors[0]
    return (y.device.type == "cpu" and y.dtype == torch.float32
            and (y.is_contiguous() or (y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)))
            and all(same_layout(t, y) for t in tensors[1:]))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.stride() == b.stride()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def fused_forward(y: torch.Tensor, fy: torch.Tensor, d: Optional[torch.Tensor], t0: torch.Tensor, t1: torch.Tensor,
                  y_out: Optional[torch.Tensor] = None, d_out: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """`apg2_step` in one pass (`_apg2.c`) into y_out, d_out: fresh tensors if None, or y, d themselves (d None: 0)."""
    y1 = torch.empty_like(y) if y_out is None else y_out
    d1 = torch.empty_like(y) if d_out is None else d_out
    _forward(y.data_ptr(), fy.data_ptr(), _ptr(d), y1.data_ptr(), d1.data_ptr(), y.numel(), float(t0), float(t1),
             torch.get_num_threads())
    return y1, d1


def rebuild_d(kept: Optional[torch.Tensor], ys: Sequence[torch.Tensor], ts: torch.Tensor) -> List[torch.Tensor]:
    """d_{a+1}..d_k, forward from the kept d_a (None: d_0 = 0) through ys = y_a..y_k and ts = t_a..t_k, as the driver
    went: d_{j+1} = (1 - t_j)(d_j + F_j / t_j), F_j rebuilt from y_j, y_{j+1}, d_j. The map d_j -> d_{j+1}
    contracts, so these are the driver's d's to float32 rounding."""
    if fusable(*ys, *([] if kept is None else [kept])):
        ds = [torch.empty_like(ys[0]) for _ in ys[1:]]
        steps = len(ds)
        _rebuild((ctypes.c_void_p * (steps + 1))(*[y.data_ptr() for y in ys]), _ptr(kept),
                 (ctypes.c_void_p * steps)(*[d.data_ptr() for d in ds]), steps,
                 (ctypes.c_float * (steps + 1))(*ts.tolist()), ys[0].numel(), torch.get_num_threads())
        return ds
    d, ds = torch.zeros_like(ys[0]) if kept is None else kept, []
    for j in range(len(ys) - 1):
        d = next_d(d, rebuilt_f(ys[j], ys[j + 1], d, ts[j], ts[j + 1]), ts[j])
        ds.append(d)
    return ds


class Apg2Step(torch.autograd.Function):
    """`apg2_step` that saves for backward no tensor the branches do not already keep, apart from every m-th d.

    Backward needs F(y_k) and d_k. F(y_k) is rebuilt from y_k and y_{k+1} (`rebuilt_f`), which the branches save
    anyway (their first layer keeps its input). d_k is rebuilt forward from the last d_a the driver kept (a = k - k mod
    m, `rebuild_d`) through y_a..y_k, kept by the branches too. Going back from d_{k+1} instead would divide by
    1 - t_k: undefined at t = 1, the warm start. So a model of L blocks saves ~L/m state tensors more than GD rather
    than L (or 3L in plain autograd), and every gradient is autograd's to float32 rounding; the driver takes m ~
    sqrt(L). Backward reaches a segment a..a+m-1 at its last step, which rebuilds all the segment's d's at once and
    leaves the others in `rebuilt` for the steps below: one pass over the segment instead of one per step, for at
    most m - 2 state tensors held in backward, by when the later blocks' activations are freed.

    The fused path writes d' over d unless d is kept (marked dirty: d' feeds only the next step), and in backward the
    gradient of d over that of d', which in the driver is its own too, and the gradient of F(y) over a rebuilt d: a
    block then leaves the heap one fresh state tensor, as gd's x + F(x) does. Float32 CPU tensors take `_apg2.c` both
    ways; anything else (CUDA, bfloat16, odd layouts) the torch ops, which compute the same.
    """

    @staticmethod
    def forward(ctx, y, fy, d, t0, t1, ts, k, rebuilt, kept, *ys):
        """This is step k; ts = t_a..t_k (detached), rebuilt = the driver's dict of d's rebuilt in backward, by step;
        kept = d_a (None: a = 0, d_0 = 0; `d` itself: this step's d is kept), ys = y_a..y_{k-1}."""
        ctx.set_materialize_grads(False)  # the last step's d' is unused: no zeros for its gradient at backward's peak
        ctx.k, ctx.rebuilt = k, rebuilt
        ctx.fused = fusable(y, fy, d)
        if ctx.fused:
            y1, d1 = fused_forward(y, fy, d, t0, t1, d_out=None if d is kept else d)
            if d1 is d:
                ctx.mark_dirty(d1)
        else:
            y1, d1 = apg2_step(y, fy, d, t0, t1)
        ctx.save_for_backward(y, y1, t0, t1, ts, kept, *ys)
        return y1, d1

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y1, g_d1):
        y, y1, t0, t1, ts, kept, *ys = ctx.saved_tensors
        d = kept if not ys else ctx.rebuilt.pop(ctx.k, None)  # popped: a retained graph's next backward rebuilds
        if d is None and ys:
            *below, d = rebuild_d(kept, ys + [y], ts)
            ctx.rebuilt.update(enumerate(below, ctx.k - len(ys) + 1))
        if ctx.fused:  # gradients may arrive in the other dense layout (ConvNeXt's head gives NCHW): copy once
            layout = torch.channels_last if y.dim() == 4 and not y.is_contiguous() else torch.contiguous_format
            g_y1 = g_y1.contiguous(memory_format=layout)
            g_d1 = None if g_d1 is None else g_d1.contiguous(memory_format=layout)
        if ctx.fused and fusable(y, g_y1, *([] if g_d1 is None else [g_d1]), *([] if d is None else [d])):
            g_fy = d if ys else torch.empty_like(y)  # a rebuilt d is this backward's own
            g_d = None if not ctx.needs_input_grad[2] else torch.empty_like(y) if g_d1 is None else g_d1
            g_t = (ctypes.c_double * 2)()
            _backward(y.data_ptr(), y1.data_ptr(), _ptr(d), g_y1.data_ptr(), _ptr(g_d1), g_fy.data_ptr(), _ptr(g_d),
                      y.numel(), float(t0), float(t1), torch.get_num_threads(), g_t)
            g_t0, g_t1 = t0.new_tensor(g_t[0]), t1.new_tensor(g_t[1])
            return g_y1, g_fy, g_d, g_t0, g_t1, None, None, None, None, *[None] * len(ys)
        d = torch.zeros_like(y) if d is None else d
        fy = rebuilt_f(y, y1, d, t0, t1)
        d1 = next_d(d, fy, t0)
        g_d1 = t1 * g_y1 if g_d1 is None else g_d1 + t1 * g_y1  # d' reaches the loss directly and through y'
        g_t0 = -(g_d1 * (d + fy / (t0 * t0))).sum()
        return (g_y1, g_y1 + g_d1 * ((1 - t0) / t0), g_d1 * (1 - t0), g_t0, (g_y1 * d1).sum(), None, None, None, None,
                *[None] * len(ys))


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
        trail: List[torch.Tensor] = []  # apg2 with autograd: the last d kept for backward and the states since
        rebuilt: Dict[int, torch.Tensor] = {}  # and the d's its backward rebuilds (Apg2Step)
        # apg2 without autograd on float32 CPU: the fused step, with the t_k as floats and the y_k it may write over
        # decided once per forward, and per block only F(y)'s layout checked. Between branches the caches are cold
        # for Python: there the general path's checks cost ~190 us per block, ~0.5% of ViT-Ti's inference.
        ts, writable = self.inference_plan(x) if self.scheme == "apg2" and not torch.jit.is_scripting() \
            and not torch.is_grad_enabled() else ([], [])
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
                        elif ts and same_layout(fy, y):  # written over the old state: docs/models.md
                            y, d = fused_forward(y, fy, d, ts[k], ts[k + 1], y_out=y if writable[k] else None, d_out=d)
                        else:
                            y, d = self.apg2_step_lean(y, fy, d, self.coef[k], self.coef[k + 1], k, trail, rebuilt)
                if k in keep:
                    kept.append(x)
        return x, kept

    @torch.jit.unused
    def apg2_step_lean(self, y: torch.Tensor, fy: torch.Tensor, d: torch.Tensor, t0: torch.Tensor,
                       t1: torch.Tensor, k: int, trail: List[torch.Tensor], rebuilt: Dict[int, torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        # tracers (fx, fvcore) cannot see into a Function
        if not torch.is_grad_enabled() or is_fx_symbolic_tracing() or torch.jit.is_tracing():
            return apg2_step(y, fy, d, t0, t1)
        # every m-th d is kept for backward, which rebuilds the others from it (Apg2Step)
        a = k - k % math.ceil(math.sqrt(len(self)))
        if k == a:
            trail[:] = [d] if a > 0 else []  # d_0 = 0 needs no keeping
        kept, ys = (trail[0], trail[1:]) if a > 0 else (None, list(trail))
        trail.append(y)
        return Apg2Step.apply(y, fy, d, t0, t1, self.coef.detach()[a:k + 1], k, rebuilt, kept, *ys)

    @torch.jit.unused
    def inference_plan(self, x: torch.Tensor) -> Tuple[List[float], List[bool]]:
        """For a forward without autograd from x: t_0..t_L-1 if `_apg2.c` can run its steps (none if not), and per
        branch whether its input y_k is the driver's own to overwrite: not the caller's y_0, and no forward hook
        (global, or on the branch or inside it) that may hold on to it."""
        if not fusable(x):
            return [], []
        hooked = bool(_global_forward_hooks or _global_forward_pre_hooks)
        writable = [k > 0 and not hooked and not any(m._forward_hooks or m._forward_pre_hooks for m in f.modules())
                    for k, f in enumerate(self)]
        return self.coef.tolist(), writable

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
