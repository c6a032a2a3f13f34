"""python -m timm_optdnn.training (or `python -m train` from a checkout) --config configs/<recipe>.yaml
[section.key=value ...] [--plan [--measure]]"""
import argparse
import sys

from .config import ConfigError, load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m timm_optdnn.training", description=__doc__)
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--plan", action="store_true", help="print the resolved run plan (memory, time) and exit")
    p.add_argument("--measure", action="store_true", help="with --plan: time a few real training steps on this "
                   "machine's device and plan from the measured speed and memory")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.key=value recipe overrides, values parsed as YAML")
    args = p.parse_args(argv)
    if args.measure and not args.plan:
        p.error("--measure goes with --plan")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        from .plan import print_plan
        print_plan(cfg, measure_steps=5 if args.measure else 0)
        return 0
    from .trainer import main as train_main
    return train_main(cfg)


if __name__ == "__main__":
    sys.exit(main())
