"""The `slowfast-adapter` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, run

    values = {}
    if args.recipe:
        import yaml

        values = yaml.safe_load(Path(args.recipe).read_text()) or {}
    for key in ("output_dir", "steps", "num_frames", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    try:
        config = QuickstartConfig(**values)
    except TypeError as err:
        raise SystemExit(f"slowfast-adapter quickstart: bad recipe {args.recipe}: {err}") from err
    run(config)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .adapter_io import read_adapter_config

    meta = read_adapter_config(args.directory)
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def _flops(args: argparse.Namespace) -> int:
    from .flops import run_cli

    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="slowfast-adapter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser(
        "quickstart",
        help="Offline end to end: tiny base, mp4 videos, wrap, train, save, reload, generate.",
    )
    quick.add_argument("--recipe", help="YAML file with QuickstartConfig fields (e.g. recipes/quickstart.yaml).")
    quick.add_argument("--output-dir", dest="output_dir")
    quick.add_argument("--steps", type=int)
    quick.add_argument("--num-frames", dest="num_frames", type=int)
    quick.add_argument("--seed", type=int)
    quick.set_defaults(func=_quickstart)

    inspect = commands.add_parser("inspect", help="Print an adapter folder's config and base model.")
    inspect.add_argument("directory")
    inspect.set_defaults(func=_inspect)

    flops = commands.add_parser("flops", help="Exact FLOPs on the meta device (no weights): base model vs slow-fast.")
    from .flops import add_cli_arguments

    add_cli_arguments(flops)
    flops.set_defaults(func=_flops)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
