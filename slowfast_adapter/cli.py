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
    from .adapter_io import AdapterError, inspect_summary, read_adapter_config

    try:
        if args.json:
            print(json.dumps(read_adapter_config(args.directory), indent=2, sort_keys=True))
        else:
            print(inspect_summary(args.directory))
    except AdapterError as err:
        print(f"slowfast-adapter inspect: {err}", file=sys.stderr)
        return 1
    return 0


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

    inspect = commands.add_parser(
        "inspect", help="Summarise an adapter folder: base model, parameter counts, LoRA, projector, config."
    )
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="Print adapter_config.json as is instead.")
    inspect.set_defaults(func=_inspect)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
