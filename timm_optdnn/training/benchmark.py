"""Speed and memory of each OptDNN-APG2 model next to its GD twin (the plain baseline), on CPU.

    python -m timm_optdnn.training.benchmark vit_ti vit_s convnext_iso_s --batch-size 32 --img-size 224

In the spirit of timm's benchmark.py: inference img/s (eval, inference_mode) and train-step img/s
(forward, cross-entropy, backward, SGD step, as timm does), for the pair side by side in one
process. The machine may be shared, so the two models are measured interleaved, in alternating
order, `--repeats` times, and the median (and min-max) is reported. The ratio APG2 / GD is the
median (min-max) of each round's ratio, APG2 against the GD run seconds next to it. As in the
trainer, glibc keeps freed memory for reuse (`retain_freed_memory`), so activations do not
page-fault afresh on every step.

What APG2 adds is only the scheme's update between blocks, a few ms per step, which the whole steps' noise
on a shared machine (+-10-15% per step here) hides. So the update is also timed alone: the same driver over
branches that replay a stored F(y) at the model's state shape (`update_ms`), and the ratio row gives the speed
ratio that difference implies on the GD twin's step time.

Memory, measured two ways because CPU has no max_memory_allocated():
- saved: the bytes autograd keeps for backward during a training forward pass (unique storages
  seen by `torch.autograd.graph.saved_tensors_hooks`, parameters excluded). This is what the
  scheme changes, and it is exact and noise-free.
- peak RSS: a fresh subprocess per model builds it, takes two train steps, and reports its peak
  resident memory (VmHWM) minus its RSS just before the first step: activations, grads, SGD
  momentum, backward temporaries, allocator and oneDNN scratch, all included. `--repeats` probes
  per model, interleaved with the twin's; the median is reported.
- peak live tensors: in the same subprocess, a third train step under torch.profiler; the peak of the
  bytes torch's CPU allocator has handed out and not taken back (its allocation and free events in
  time order), above the level before the step. This is the peak RSS without the heap's slack.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from ..data import setup_process
from ..flops import PUBLISHED, build
from ..models import schemes
from ..models.schemes import SchemeBlocks

MB = 2 ** 20


class Pair:
    """One model and what a train step needs; `name` is a registered optdnn_* model."""

    def __init__(self, name: str, batch_size: int, img_size: int):
        torch.manual_seed(0)
        self.name = name
        self.model = build(name, img_size)
        self.optimizer = create_optimizer_v2(self.model, "sgd", lr=1e-4)  # timm's benchmark.py optimizer
        self.x = torch.randn(batch_size, 3, img_size, img_size)
        self.y = torch.randint(self.model.num_classes, (batch_size,))

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.x)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def saved_bytes(self) -> int:
        self.model.train()
        return saved_bytes(self.model, lambda: F.cross_entropy(self.model(self.x), self.y))


def saved_bytes(model: nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes autograd saves for backward while `forward()` runs (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()  # views of one storage count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out  # frees the graph; nothing else to run
    return sum(saved.values())


class Replay(nn.Module):
    """A branch whose F(y) is a stored tensor, so SchemeBlocks over these runs the scheme's own update and nothing else."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.out


def update_ms(pairs: Sequence[Pair], rounds: int) -> Dict[str, Dict[str, float]]:
    """Milliseconds per batch that each model's scheme update costs (the driver over all blocks, forward, and in
    training backward too), the branches replaced by `Replay` at the model's state shape and layout: median of
    `rounds` interleaved runs. Over a few ms this is far steadier here than the whole steps, whose difference it is."""
    state: List[torch.Tensor] = []
    with torch.no_grad():
        hook = pairs[0].model.blocks.register_forward_pre_hook(lambda m, args: state.append(args[0]))
        pairs[0].model(pairs[0].x)
        hook.remove()
    x = state[0]
    drivers = []
    for p in pairs:
        blocks = p.model.blocks
        replay = SchemeBlocks([Replay(torch.randn_like(x)) for _ in blocks], blocks.scheme)
        if blocks.scheme != "gd":
            replay.coef = blocks.coef
        drivers.append(replay)
    grad = torch.randn_like(x)

    def infer(d: nn.Module) -> None:
        with torch.inference_mode():
            d(x)

    def train(d: nn.Module) -> None:
        d.zero_grad(set_to_none=True)
        d(x).backward(grad)

    times: Dict[str, Dict[str, List[float]]] = {p.name: {"infer": [], "train": []} for p in pairs}
    for r in range(rounds + 2):  # 2 warm-up rounds
        for mode, fn in (("infer", infer), ("train", train)):
            for p, d in zip(pairs, drivers) if r % 2 == 0 else zip(pairs[::-1], drivers[::-1]):
                t = time.perf_counter()
                fn(d)
                if r >= 2:
                    times[p.name][mode].append((time.perf_counter() - t) * 1e3)
    return {name: {mode: statistics.median(v) for mode, v in by_mode.items()} for name, by_mode in times.items()}


def images_per_second(fn: Callable[[], None], steps: int, batch_size: int) -> Tuple[float, float]:
    """(img per wall second, img per CPU second of this process, all threads together)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return steps * batch_size / (time.perf_counter() - wall), steps * batch_size / (time.process_time() - cpu)


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def probe_rss(name: str, batch_size: int, img_size: int) -> None:
    """(Run in a fresh process.) Print the peak RSS growth of two train steps, in MiB, as JSON."""
    pair = Pair(name, batch_size, img_size)
    # a 1-image step first: it maps the kernels' code pages (hundreds of MB for oneDNN convs) and
    # warms the allocator; then drop its grads and momentum so the measured steps allocate their own
    x, y = pair.x, pair.y
    pair.x, pair.y = x[:1], y[:1]
    pair.train_step()
    pair.x, pair.y = x, y
    pair.optimizer.zero_grad(set_to_none=True)
    pair.optimizer.state.clear()
    # VmHWM, not ru_maxrss: a child of a big process inherits its parent's peak in ru_maxrss
    # (the vfork'd address space's high-water mark survives exec). Writing 5 to clear_refs
    # restarts VmHWM from the current RSS, so the peak below is the two steps' own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    for _ in range(2):  # the second step also holds SGD momentum buffers
        pair.train_step()
    peak = status_kib("VmHWM")
    live = peak_live_bytes(pair.train_step)
    print(json.dumps(dict(before_mb=before / 1024, peak_mb=peak / 1024, step_mb=(peak - before) / 1024,
                          live_mb=live / MB)))


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


def measure_rss(name: str, batch_size: int, img_size: int, threads: int) -> Tuple[float, float]:
    """(peak RSS growth, peak live tensors) of a fresh process's train steps, in MiB."""
    cmd = [sys.executable, "-m", "timm_optdnn.training.benchmark", "--probe-rss", name, "--batch-size", str(batch_size),
           "--img-size", str(img_size), "--threads", str(threads)] + ([] if schemes.FUSED else ["--unfused"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"RSS probe of {name} failed:\n{r.stderr}")
    out = json.loads(r.stdout.splitlines()[-1])
    return out["step_mb"], out["live_mb"]


def benchmark(size: str, batch_size: int = 32, img_size: int = 224, repeats: int = 5, steps: int = 3,
              threads: int = 2, rss: bool = True, log: Callable[[str], None] = lambda s: None) -> List[Dict]:
    """Measure optdnn_gd_{size} and optdnn_apg2_{size} interleaved; one result dict per model."""
    pairs = [Pair(f"optdnn_{scheme}_{size}", batch_size, img_size) for scheme in ("gd", "apg2")]
    for p in pairs:  # warm-up: oneDNN primitive caches, allocator pools
        p.infer()
        p.train_step()
    runs: Dict[str, Dict[str, List[float]]] = {p.name: {} for p in pairs}
    paired: Dict[str, List[float]] = {}
    for r in range(repeats):
        order = pairs if r % 2 == 0 else pairs[::-1]  # cancels drift in the machine's load
        for mode in ("infer", "train"):
            for p in order:
                wall, cpu = images_per_second(p.infer if mode == "infer" else p.train_step, steps, batch_size)
                runs[p.name].setdefault(f"{mode}_img_s", []).append(wall)
                runs[p.name].setdefault(f"{mode}_img_cpu_s", []).append(cpu)
        for key, v in runs[pairs[1].name].items():  # APG2 against the GD run next to it: drift cancels
            paired.setdefault(key, []).append(v[-1] / runs[pairs[0].name][key][-1])
        log(f"{size} repeat {r + 1}/{repeats}: " + ", ".join(f"{p.name} " + " ".join(
            f"{k} {v[-1]:.2f}" for k, v in runs[p.name].items()) for p in pairs))
    update = update_ms(pairs, rounds=max(20, repeats))
    rss_runs: Dict[str, List[Tuple[float, float]]] = {p.name: [] for p in pairs}
    for r in range(repeats if rss else 0):  # one probe's growth varies by +-60-90 MiB: median of interleaved probes
        for p in pairs if r % 2 == 0 else pairs[::-1]:
            rss_runs[p.name].append(measure_rss(p.name, batch_size, img_size, threads))
    results = []
    for p in pairs:
        results.append(dict(
            model=p.name, batch_size=batch_size, img_size=img_size, threads=threads, repeats=repeats, steps=steps,
            **{k: statistics.median(v) for k, v in runs[p.name].items()},
            **{f"{k}_range": (min(v), max(v)) for k, v in runs[p.name].items()},
            saved_mb=p.saved_bytes() / MB,
            update_infer_ms=update[p.name]["infer"], update_train_ms=update[p.name]["train"],
            params_mb=sum(q.numel() * q.element_size() for q in p.model.parameters()) / MB,
            rss_step_mb=statistics.median(v[0] for v in rss_runs[p.name]) if rss else None,
            live_step_mb=statistics.median(v[1] for v in rss_runs[p.name]) if rss else None))
    results[1].update({f"{k}_paired": (statistics.median(v), min(v), max(v)) for k, v in paired.items()})
    return results


def ratio(gd: Dict, apg2: Dict, key: str) -> str:
    """APG2 / GD: for speeds the median (min-max) of the rounds' paired ratios, for memory the plain ratio; for the
    update's cost the speed ratio it implies if the steps differed by that alone: t_gd / (t_gd + apg2 - gd)."""
    if key.startswith("update_"):
        mode = key.split("_")[1]
        step_ms = 1e3 * gd["batch_size"] / gd[f"{mode}_img_s"]
        return f"implied **{step_ms / (step_ms + apg2[key] - gd[key]):.3f}**"
    if f"{key}_paired" in apg2:
        mid, lo, hi = apg2[f"{key}_paired"]
        return f"**{mid:.3f}** ({lo:.2f}-{hi:.2f})"
    return "-" if not gd[key] or apg2[key] is None else f"**{apg2[key] / gd[key]:.3f}**"


COLUMNS = {  # result key -> table header
    "infer_img_s": "infer img/s", "infer_img_cpu_s": "infer img/CPU-s",
    "train_img_s": "train img/s", "train_img_cpu_s": "train img/CPU-s",
    "saved_mb": "saved for backward (MiB)", "live_step_mb": "train-step peak live tensors (MiB)",
    "rss_step_mb": "train-step peak RSS growth (MiB)",
    "update_infer_ms": "scheme update, infer (ms/batch)", "update_train_ms": "scheme update, train (ms/step)",
}


def format_rows(gd: Dict, apg2: Dict) -> str:
    """Markdown rows: GD, APG2, then the APG2 / GD ratio; speeds as median (min-max)."""
    def cell(r: Dict, key: str) -> str:
        if r[key] is None:
            return "-"
        lo_hi = r.get(f"{key}_range")
        return f"{r[key]:.2f} ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else f"{r[key]:.{1 if key.endswith('_mb') else 2}f}"

    lines = [f"| {r['model']} | " + " | ".join(cell(r, k) for k in COLUMNS) + " |" for r in (gd, apg2)]
    lines.append("| **apg2 / gd** | " + " | ".join(ratio(gd, apg2, k) for k in COLUMNS) + " |")
    return "\n".join(lines)


TABLE_HEADER = "| model | " + " | ".join(COLUMNS.values()) + " |\n|---|" + "---:|" * len(COLUMNS)


def format_table(results: Sequence[Dict]) -> str:
    return "\n".join([TABLE_HEADER] + [format_rows(gd, apg2) for gd, apg2 in zip(results[::2], results[1::2])])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="optdnn-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", default=["vit_ti", "vit_s", "convnext_iso_s"],
                        help=f"model sizes, each run as optdnn_gd_<size> vs optdnn_apg2_<size>: {', '.join(PUBLISHED)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved APG2/GD rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--unfused", action="store_true", help="run the apg2 step in torch ops, not _apg2.c")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--probe-rss", metavar="MODEL", help=argparse.SUPPRESS)  # the RSS subprocess
    args = parser.parse_args(argv)
    for flag in ("batch_size", "img_size", "repeats", "steps", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    unknown = [s for s in args.sizes if s not in PUBLISHED]
    if unknown:
        parser.error(f"unknown model size(s) {unknown}; choose from {list(PUBLISHED)}")
    torch.set_num_threads(args.threads)
    schemes.FUSED = not args.unfused
    setup_process()  # as the trainer runs: freed activations are reused, not page-faulted anew
    if args.probe_rss:
        return probe_rss(args.probe_rss, args.batch_size, args.img_size)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  progress, off the table's stdout
    log(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size} at {args.img_size} px, "
        f"{args.repeats} x {args.steps} steps, apg2 step {'fused' if schemes.FUSED else 'in torch ops'}, "
        f"load average {open('/proc/loadavg').read().split()[:3]}")
    if args.format == "table":  # one pair at a time: a long run shows what it has measured so far
        print(TABLE_HEADER, flush=True)
    results = []
    for size in args.sizes:
        gd, apg2 = benchmark(size, args.batch_size, args.img_size, args.repeats, args.steps, args.threads,
                             not args.no_rss, log)
        results += [gd, apg2]
        if args.format == "table":
            print(format_rows(gd, apg2), flush=True)
    if args.format == "json":
        print(json.dumps(results, indent=1))
    log(f"load average at the end {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
