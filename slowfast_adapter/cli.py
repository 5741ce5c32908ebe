"""The `slowfast-adapter` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .configs import SHIPPED_CONFIGS
from .version import __version__


class CliError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


def _read_yaml(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise CliError(f"{path} does not exist (give a YAML file).")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise CliError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise CliError(f"{path} must hold key: value pairs, not {type(values).__name__}.")
    return values


def _config(cls: type, values: dict, source: str):
    """`cls(**values)` with unknown keys, wrong types and out-of-range values reported by name (before anything runs).

    Integer fields must be >= 1 (`seed`, `eval_every` >= 0), float fields finite (learning rates > 0),
    `output_dir` a folder name, `slowfast` a `SlowFastConfig`'s fields."""
    import math
    import typing

    from .config import SlowFastConfig
    from .training.recipe import _accepts, _describe

    known = sorted(cls.__dataclass_fields__)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CliError(f"unknown keys {unknown} in {source}; known: {known}.")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _accepts(hints[key], value):
            raise CliError(f"bad value in {source}: {key} must be {_describe(hints[key])}, got {value!r}.")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CliError(f"bad value in {source}: {key} must be a finite number, got {value}.")
        if key.endswith("lr") or key == "learning_rate":
            if value <= 0:
                raise CliError(f"bad value in {source}: {key} must be > 0, got {value}.")
            continue
        low = 0 if key in ("seed", "eval_every") else 1
        if isinstance(value, int) and not _accepts(hints[key], 0.5) and value < low:  # integer fields only
            raise CliError(f"bad value in {source}: {key} must be >= {low}, got {value}.")
    if "output_dir" in values and (not values["output_dir"] or Path(values["output_dir"]).is_file()):
        raise CliError(f"bad value in {source}: output_dir {values['output_dir']!r} must name a folder.")
    slowfast = values.get("slowfast")
    if slowfast is not None:
        try:
            SlowFastConfig(**slowfast)
        except (TypeError, ValueError) as err:
            raise CliError(f"bad value in {source}: slowfast: {err}") from err
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CliError(f"bad value in {source}: {err}") from err


def _quickstart(args: argparse.Namespace) -> int:
    from .demo.quickstart import QuickstartConfig, run

    values = _read_yaml(args.recipe) if args.recipe else {}
    for key in ("output_dir", "steps", "num_frames", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    run(_config(QuickstartConfig, values, args.recipe or "the arguments"))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import yaml

    from .demo.experiment import DemoConfig, check_output_dir, run
    from .training.recipe import yaml_numbers

    values = _read_yaml(args.recipe) if args.recipe else {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if not _ or key not in DemoConfig.__dataclass_fields__:
            fields = sorted(DemoConfig.__dataclass_fields__)
            raise CliError(f"bad override {item!r}; use key=value with a DemoConfig field: {fields}.")
        values[key] = yaml.safe_load(value)
    config = _config(DemoConfig, yaml_numbers(values), args.recipe or "the overrides")
    try:
        check_output_dir(config)
    except FileExistsError as err:
        raise CliError(str(err)) from err
    run(config)
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging

    from .training.data import TrainingDataError
    from .training.recipe import Recipe
    from .training.train import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("slowfast_adapter").setLevel(logging.INFO)
    _read_yaml(args.recipe)  # exists and parses
    try:
        recipe = Recipe.from_yaml(args.recipe, args.overrides)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"bad recipe {args.recipe}: {err}") from err
    if not Path(recipe.data.train_file).is_file():
        raise CliError(f"data.train_file {recipe.data.train_file} does not exist.")
    _check_model_source(recipe.model.name_or_path)
    try:
        summary = train(recipe)  # checks that every video/image file exists before the base loads
    except TrainingDataError as err:
        raise CliError(str(err)) from err
    return 3 if summary["stopped_early"] else 0


def _check_model_source(name: str) -> None:
    """A base model is a local folder or a Hub repo id (reachable unless HF_HUB_OFFLINE is set)."""
    if Path(name).expanduser().is_dir():
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CliError(f"model.name_or_path {name!r} is neither an existing folder nor a Hub repo id.") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CliError(f"model.name_or_path {name!r} is not a local folder, and HF_HUB_OFFLINE is set (no Hub).")


def _serve(args: argparse.Namespace) -> int:
    from .serve import server

    try:
        return server.run(args)
    except server.ServeError as err:
        raise CliError(str(err)) from err


def _inspect(args: argparse.Namespace) -> int:
    from .io.adapter_io import AdapterError, inspect_summary, read_adapter_config
    from .io.files import CONFIG_NAME

    directory = Path(args.directory)
    if not (directory / CONFIG_NAME).exists() and (directory / "adapter" / CONFIG_NAME).is_file():
        raise CliError(
            f"{directory} is a training run's output folder, not an adapter folder: its adapter is "
            f"{directory / 'adapter'} (slowfast-adapter inspect {directory / 'adapter'})."
        )
    try:
        if args.json:
            print(json.dumps(read_adapter_config(args.directory, recover=False), indent=2, sort_keys=True))
        else:
            print(inspect_summary(args.directory))
    except AdapterError as err:
        raise CliError(str(err)) from err
    return 0


def _flops(args: argparse.Namespace) -> int:
    _check_flops_arguments(args)
    from .tools.flops import run_cli

    return run_cli(args)


def _check_flops_arguments(args: argparse.Namespace) -> None:
    """Everything `flops` is given, checked before any model is built or file written."""
    from .config import SlowFastConfig

    model = Path(args.model).expanduser()
    if not (
        model.is_dir() or model.is_file() or args.model in SHIPPED_CONFIGS or args.model in SHIPPED_CONFIGS.values()
    ):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.model)
        except HFValidationError:
            raise CliError(
                f"model {args.model!r} is neither an existing folder or config.json, a shipped config "
                f"({', '.join(SHIPPED_CONFIGS)}), nor a Hub repo id."
            ) from None
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise CliError(f"model {args.model!r} is not a local folder or file, and HF_HUB_OFFLINE is set (no Hub).")
    if model.is_dir() and not (model / "config.json").is_file():
        raise CliError(f"model folder {args.model} holds no config.json.")
    numbers = {"--frames": (args.frames, 1), "--base-frames": ([args.base_frames], 1),
               "--text-tokens": ([args.text_tokens], 0), "--image-size": ([args.image_size], 1)}  # fmt: skip
    for flag, (given, low) in numbers.items():
        bad = [v for v in given if v is not None and v < low]
        if bad:
            raise CliError(f"{flag} must be >= {low}, got {bad[0]}.")
    values: dict = {}
    if args.slowfast_config:
        path = Path(args.slowfast_config)
        if not path.is_file():
            raise CliError(f"--slowfast-config {path} does not exist (give a JSON file of SlowFastConfig fields).")
        try:
            values = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CliError(f"--slowfast-config {path} is not valid JSON ({err}).") from err
        if not isinstance(values, dict):
            raise CliError(f"--slowfast-config {path} must hold a JSON object of SlowFastConfig fields.")
    for name in ("temporal_sampling_stride", "temporal_pooling_stride", "spatial_pooling_stride", "min_fast_frames",
                 "hybrid_layer_interval", "hybrid_layer_start", "hybrid_layers", "query_tokens"):  # fmt: skip
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    try:
        SlowFastConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CliError(f"bad SlowFastConfig: {err}") from err
    if args.json_path not in (None, "-"):
        target = Path(args.json_path)
        if target.is_dir() or not target.parent.is_dir():
            raise CliError(f"--json {target}: give a file in an existing folder.")


def _flops_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `slowfast-adapter flops`."""
    parser.add_argument(
        "model",
        help="A local model folder or config.json, a Hub id (only config.json is fetched), or a shipped config: "
        + ", ".join(f"{name} ({hub})" for name, hub in SHIPPED_CONFIGS.items()),
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[128], help="Slow-fast frame counts (columns).")
    parser.add_argument(
        "--base-frames",
        type=int,
        help="Frames of the base model at its native tokens (default: as many as give the first column's fast tokens).",
    )
    parser.add_argument("--text-tokens", type=int, default=100, help="Text tokens of the prompt (default 100).")
    parser.add_argument(
        "--image-size",
        type=int,
        help="Square frame size in px for Qwen families (default: the family's, 448).",
    )
    parser.add_argument("--slowfast-config", help="JSON file with SlowFastConfig fields; the flags below override it.")
    for flag, name in (
        ("--sampling-stride", "temporal_sampling_stride"),
        ("--pooling-stride", "temporal_pooling_stride"),
        ("--spatial-stride", "spatial_pooling_stride"),
        ("--min-fast-frames", "min_fast_frames"),
        ("--hybrid-interval", "hybrid_layer_interval"),
        ("--hybrid-start", "hybrid_layer_start"),
    ):
        parser.add_argument(flag, dest=name, type=int, help=f"SlowFastConfig.{name}")
    parser.add_argument(
        "--hybrid-layers", dest="hybrid_layers", type=int, nargs="+", help="SlowFastConfig.hybrid_layers"
    )
    parser.add_argument("--query-tokens", dest="query_tokens", help="SlowFastConfig.query_tokens")
    parser.add_argument(
        "--json", dest="json_path", help="Also write the report as JSON to this file ('-' = stdout only)."
    )


QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' info/warning lines
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also turns off transformers' "Loading weights" bars
    # torch's C++ warnings, which Python's warning filters never see: DDP's "find_unused_parameters=True ... did not
    # find any unused parameters" on every rank (the flag is on because text-only batches leave the adapter unused)
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
# Warnings that say nothing actionable in our commands (we set these up on purpose).
QUIET_WARNINGS = (
    r".*use_cache=True.*is incompatible with gradient checkpointing.*",
    r".*find_unused_parameters=True.*",
    r".*is_gradient_checkpointing.*deprecated.*",
)


def quiet(verbose: bool) -> None:
    """Quiet by default: our own progress bars and results only; `--verbose` keeps every library message.
    Environment variables (inherited by torchrun workers) are only set where the user has not set them."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="slowfast-adapter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slowfast-adapter {__version__}")
    parser.add_argument("--verbose", action="store_true", help="Show every library message and progress bar.")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser(
        "quickstart",
        help="Offline end to end: tiny base, mp4 videos, wrap, train, save, reload, generate.",
    )
    quick.add_argument("--recipe", help="YAML file with QuickstartConfig fields (e.g. recipes/quickstart.yaml).")
    quick.add_argument("--output-dir", dest="output_dir", help="Folder it writes into (default quickstart-output).")
    quick.add_argument("--steps", type=int, help="Adapter training steps (default 150).")
    quick.add_argument("--num-frames", dest="num_frames", type=int, help="Frames read per video (default 16).")
    quick.add_argument("--seed", type=int, help="Random seed of the videos, the base and the training (default 0).")
    quick.set_defaults(func=_quickstart)

    demo = commands.add_parser(
        "demo",
        help="The needle-in-a-haystack experiment: pretrain a tiny base, train the adapter, compare 4 settings.",
    )
    demo.add_argument("--recipe", help="YAML file of DemoConfig fields, e.g. a line `adapter_steps: 200`.")
    demo.add_argument("overrides", nargs="*", help="DemoConfig overrides as key=value (e.g. adapter_steps=200).")
    demo.set_defaults(func=_demo)

    train = commands.add_parser(
        "train",
        help="Fine-tune the adapter with a recipe (accelerate: CPU, DDP, FSDP, DeepSpeed; see recipes/).",
        description="Fine-tune the adapter with a recipe. Multi-process: launch with torchrun or accelerate launch "
        "(recipes/accelerate/*.yaml). Exit status 3: stopped by SIGTERM/SIGINT after writing a checkpoint.",
    )
    train.add_argument("recipe", help="YAML recipe (sections model, slowfast, data, train), e.g. recipes/tiny_cpu.yaml")
    train.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="Recipe overrides, e.g. train.max_steps=100"
    )
    train.set_defaults(func=_train)

    inspect = commands.add_parser(
        "inspect", help="Summarise an adapter folder: base model, parameter counts, LoRA, projector, config."
    )
    inspect.add_argument("directory", help="An adapter folder (a training run's is its output folder's adapter/).")
    inspect.add_argument("--json", action="store_true", help="Print adapter_config.json as is instead.")
    inspect.set_defaults(func=_inspect)

    flops = commands.add_parser("flops", help="Exact FLOPs on the meta device (no weights): base model vs slow-fast.")
    _flops_arguments(flops)
    flops.set_defaults(func=_flops)

    serve = commands.add_parser(
        "serve",
        help="An OpenAI-compatible chat-completions server for a base and its adapters (the [serve] extra).",
        description="Serve POST /v1/chat/completions (video_url and image_url parts, streaming), GET /v1/models, "
        "/health and /metrics on 127.0.0.1 unless --host says otherwise. See docs/guides/serving.md.",
    )
    from .serve.server import add_arguments as serve_arguments

    serve_arguments(serve)
    serve.set_defaults(func=_serve)

    args = parser.parse_args(argv)
    quiet(args.verbose)
    try:
        return args.func(args)
    except CliError as err:
        print(f"slowfast-adapter {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
