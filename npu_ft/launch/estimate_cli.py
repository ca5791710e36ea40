"""``npu-ft estimate RECIPE [key=value ...] [--card CARD] [--nodes N --devices-per-node M]``: the
memory a recipe needs per card, part by part, with the assumptions behind it, and whether it fits.

Exit codes: 0 (printed; fits or not), 1 (a recipe or card the estimator cannot read), 2 (usage).
"""

from __future__ import annotations

import argparse
import sys

_USAGE = ("npu-ft estimate RECIPE [key=value ...] [--card 910B3-64G|910B4-32G|A100-80G|H100-80G|custom:GiB] "
          "[--nodes N --devices-per-node M]")


def format_breakdown(est, assumptions: list[str], target, world_size: int) -> str:
    """The table ``npu-ft estimate`` prints."""
    from .estimate import GIB

    rows = [
        ("weights (frozen / trained)", est.weights - est.adapters),
        ("adapters (LoRA, fp32)", est.adapters),
        ("gradients", est.gradients),
        ("optimizer states", est.optimizer),
        ("activations (checkpointing policy)", est.activations - est.loss),
        ("loss (chunk or logits)", est.loss),
        ("runtime overhead", est.overhead),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"per card ({target.name}, {world_size} card(s) in all):"]
    lines += [f"  {name.ljust(width)}  {value / GIB:8.2f} GiB" for name, value in rows]
    lines.append(f"  {'total'.ljust(width)}  {est.total_gib:8.2f} GiB")
    usable = target.usable_bytes / GIB
    verdict = "fits" if est.total <= target.usable_bytes else "DOES NOT FIT"
    lines.append(f"  {'usable on the card'.ljust(width)}  {usable:8.2f} GiB -> {verdict}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in assumptions]
    return "\n".join(lines)


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--card", default="910B3-64G", help="910B3-64G (default), 910B4-32G, A100-80G, H100-80G or "
                                                       "custom:<GiB>")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--devices-per-node", type=int, default=1, help="cards per node (default 1)")
    return p


def estimate_main(argv: list[str]) -> int:
    p = _parser("npu-ft estimate", "memory per card of a recipe: breakdown, assumptions, fits or not")
    p.usage = _USAGE
    p.add_argument("recipe", help="LLaMA-Factory style YAML recipe")
    p.add_argument("overrides", nargs="*", help="key=value changes to the recipe")
    args = p.parse_intermixed_args(argv)
    if args.nodes < 1 or args.devices_per_node < 1:
        p.error("--nodes and --devices-per-node must be >= 1")
    from npu_ft.config import ConfigError, load_config

    from .budget import EstimateError, card, recipe_estimate

    try:
        target = card(args.card)
        cfg = load_config(args.recipe, args.overrides)
        world = args.nodes * args.devices_per_node
        est, assumptions, _ = recipe_estimate(cfg, target, world)
    except (ConfigError, EstimateError) as exc:
        print(f"npu-ft estimate: {exc}", file=sys.stderr)
        return 1
    print(f"{args.recipe}: {cfg.method}")
    print(format_breakdown(est, assumptions, target, world))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(estimate_main(sys.argv[1:]))
