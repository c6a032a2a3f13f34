"""Training speed and memory of each OptDNN-APG2 model next to its GD twin, eager and compiled, in one run.

    python -m timm_optdnn.training.benchmark vit_ti convnext_iso_s --batch-size 32 --img-size 224
    python -m timm_optdnn.training.benchmark vit_s --device cuda        # bf16 autocast, as the trainer runs

A train step is timm's benchmark.py one: forward, cross-entropy, backward, SGD step (on CUDA under bf16 autocast,
fp32 weights). For each size, optdnn_gd_<size> and optdnn_apg2_<size> are built once and measured eager and under
torch.compile (inductor, the whole model), interleaved: `--repeats` rounds of `--steps` steps, the order of the two
models alternating each round, so that a shared machine's drift cancels in the paired ratios. Speeds are the
median (min-max) over rounds; a ratio is the median (min-max) of the rounds' own ratios.

Peak memory is the most bytes of tensors alive at once during a step, above those alive before it (activations,
gradients, temporaries): torch.cuda.max_memory_allocated on CUDA, the CPU allocator's events under torch.profiler
on CPU. The table and the command that produced it go to stdout, progress to stderr.
"""
import argparse
import json
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import timm_optdnn  # noqa: F401  registers the optdnn_* models
from .trainer import compile_kwargs

MB = 2 ** 20
MODES = ("eager", "compiled")
SIZES = sorted(name[len("optdnn_gd_"):] for name in timm.list_models("optdnn_gd_*"))


class TrainStep:
    """One model's train step on a fixed random batch, eager or compiled."""

    def __init__(self, name: str, batch_size: int, img_size: int, device: torch.device, compiled: bool):
        torch.manual_seed(0)
        size_kwargs = dict(img_size=img_size) if "vit" in name else {}  # ViT's position embedding is sized for it
        self.model = timm.create_model(name, **size_kwargs).to(device).train()
        self.forward = torch.compile(self.model, **compile_kwargs(device)) if compiled else self.model
        self.optimizer = create_optimizer_v2(self.model, "sgd", lr=1e-4)  # timm's benchmark.py optimizer
        self.x = torch.randn(batch_size, 3, img_size, img_size, device=device)
        self.y = torch.randint(self.model.num_classes, (batch_size,), device=device)
        self.device = device

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def seconds(self, steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self()
        sync()
        return time.perf_counter() - start

    def peak_bytes(self) -> int:
        """Most bytes of tensors alive at once during one step, above those alive before it."""
        if self.device.type == "cuda":
            sync()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self()
            sync()
            return torch.cuda.max_memory_allocated(self.device) - before
        return peak_live_bytes(self)


def sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_live_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes of tensors alive at once while fn() runs, above those alive before (torch's CPU allocator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # nbytes: + allocated, - freed
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(size: str, mode: str, batch_size: int, img_size: int, device: torch.device, repeats: int, steps: int,
            log: Callable[[str], None]) -> Dict[str, Dict]:
    """img/s per round and peak step memory of optdnn_gd_<size> and optdnn_apg2_<size> in one mode, interleaved."""
    pair = {scheme: TrainStep(f"optdnn_{scheme}_{size}", batch_size, img_size, device, mode == "compiled")
            for scheme in ("gd", "apg2")}
    for scheme, step in pair.items():  # warm-up: compilation, allocator pools, kernel caches
        t = step.seconds(2)
        log(f"{size} {mode} {scheme}: warm-up {t:.1f} s")
    results = {scheme: dict(img_s=[], peak_mb=step.peak_bytes() / MB) for scheme, step in pair.items()}
    for r in range(repeats):
        for scheme in ("gd", "apg2") if r % 2 == 0 else ("apg2", "gd"):
            results[scheme]["img_s"].append(steps * batch_size / pair[scheme].seconds(steps))
        log(f"{size} {mode} round {r + 1}/{repeats}: " +
            ", ".join(f"{s} {v['img_s'][-1]:.2f} img/s" for s, v in results.items()))
    return results


def spread(values: Sequence[float], digits: int = 2) -> str:
    """median (min-max)"""
    return f"{statistics.median(values):.{digits}f} ({min(values):.2f}-{max(values):.2f})"


def ratio(num: Sequence[float], den: Sequence[float]) -> str:
    """The median (min-max) of round-by-round ratios, the median in bold."""
    return "**" + spread([a / b for a, b in zip(num, den, strict=True)], 3).replace(" (", "** (", 1)


HEADER = ("| size | scheme | eager train img/s | compiled train img/s | compiled / eager | eager peak MiB "
          "| compiled peak MiB |\n|---|---|---:|---:|---:|---:|---:|")


def rows(size: str, runs: Dict[str, Dict[str, Dict]]) -> str:
    """The gd and apg2 rows of one size, then apg2 / gd; a mode that was not run shows '-'."""
    def cell(mode: str, scheme: str, key: str) -> str:
        if mode not in runs:
            return "-"
        v = runs[mode][scheme][key]
        return spread(v) if key == "img_s" else f"{v:.1f}"

    lines = []
    for scheme in ("gd", "apg2"):
        both = all(m in runs for m in MODES)
        c_over_e = ratio(runs["compiled"][scheme]["img_s"], runs["eager"][scheme]["img_s"]) if both else "-"
        lines.append(f"| {size} | {scheme} | {cell('eager', scheme, 'img_s')} | {cell('compiled', scheme, 'img_s')} "
                     f"| {c_over_e} | {cell('eager', scheme, 'peak_mb')} | {cell('compiled', scheme, 'peak_mb')} |")
    speed = {m: ratio(runs[m]["apg2"]["img_s"], runs[m]["gd"]["img_s"]) if m in runs else "-" for m in MODES}
    memory = {m: f"{runs[m]['apg2']['peak_mb'] / runs[m]['gd']['peak_mb']:.3f}" if m in runs else "-" for m in MODES}
    lines.append(f"| {size} | **apg2 / gd** | {speed['eager']} | {speed['compiled']} | - | {memory['eager']} "
                 f"| {memory['compiled']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="optdnn-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", default=["vit_ti", "convnext_iso_s"],
                        help=f"model sizes, each run as optdnn_gd_<size> and optdnn_apg2_<size>: {', '.join(SIZES)}")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step (default 32)")
    parser.add_argument("--img-size", type=int, default=224, help="square input size in px (default 224)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager, compiled (torch.compile, inductor) or both (default)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved gd/apg2 rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model and round")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (bf16 autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="a markdown table with its command (default), or JSON rows")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "img_size", "repeats", "steps", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown model size(s) {unknown}; choose from {SIZES}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: cpu or cuda")
    if device.type == "cpu":
        from ..data import setup_process  # the trainer's: freed activations are reused, not page-faulted anew
        setup_process()
        if args.threads:
            torch.set_num_threads(args.threads)
    modes = [m for m in MODES if m in args.modes]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  progress, off the table's stdout
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log(f"torch {torch.__version__}, {where}")
    results = {size: {m: measure(size, m, args.batch_size, args.img_size, device, args.repeats, args.steps, log)
                      for m in modes} for size in args.sizes}
    if args.format == "json":
        print(json.dumps(results, indent=1))
        return
    command = "python -m timm_optdnn.training.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"`{command}` (torch {torch.__version__}, {where}, batch {args.batch_size} at {args.img_size} px, "
          f"{args.repeats} rounds of {args.steps} steps{', bf16 autocast' if device.type == 'cuda' else ''})\n")
    print(HEADER)
    for size, runs in results.items():
        print(rows(size, runs))


if __name__ == "__main__":
    main()
