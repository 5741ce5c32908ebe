"""`slowfast-adapter serve`: load a base and its adapters into an `Engine`, serve the OpenAI-compatible app.

Importing this module is cheap (the CLI builds its parser from it): torch and the engine load only in `run`.
One process by default (uvicorn on 127.0.0.1); `--ray` runs the same app as a Ray Serve deployment with replicas
(`serve/ray_app.py`). Every argument is checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RAY_OPTIONS = ("replicas", "ray_address", "replica_cpus", "batch_wait_ms", "no_video_routing")


class ServeError(ValueError):
    """A bad `serve` argument (printed as one line by the CLI)."""


def adapter_map(values: list[str]) -> dict[str, Path]:
    """name -> folder of `--adapter` values `DIR` (named after the folder) or `NAME=DIR`; folders must hold an
    adapter (adapter_config.json) and names must be distinct."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or Path(value).exists() or not NAME.fullmatch(name):
            name, folder = Path(value).resolve().name, value
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            raise ServeError(f"--adapter {value}: {folder} is not an adapter folder (no adapter_config.json in it).")
        if not NAME.fullmatch(name) or name == "base" or name.endswith(":fast-only"):
            raise ServeError(f"--adapter {value}: {name!r} cannot name a model (letters, digits, '.', '_', '-').")
        if name in adapters:
            raise ServeError(f"--adapter {value}: the name {name!r} is used twice; give NAME=DIR.")
        adapters[name] = path
    if not adapters:
        raise ServeError("give at least one --adapter DIR (or NAME=DIR).")
    return adapters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="The base model: a local folder or a Hub id.")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="An adapter folder, served as model NAME (default: the folder's name). Repeatable.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-frames", type=int, help="Frames read per video (default: each adapter's own).")
    parser.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="A folder local paths and file:// URLs may point into. Repeatable. Default: none.",
    )
    parser.add_argument("--allow-remote-media", action="store_true", help="Fetch http(s):// video and image URLs.")
    parser.add_argument("--max-frames", type=int, default=256, help="Most frames a request may ask for per video.")
    parser.add_argument("--max-media-mb", type=float, default=256.0, help="Largest video or image accepted, in MB.")
    parser.add_argument("--cache-gb", type=float, default=4.0, help="Encoded videos kept between requests, in GB.")
    parser.add_argument("--max-batch-size", type=int, default=8, help="Requests run as one batch (1: one by one).")
    parser.add_argument("--max-model-len", type=int, help="Longest prompt + answer (default: the LLM's).")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of requests that give none.")
    parser.add_argument(
        "--expose-baselines", action="store_true", help="Also serve `base` and `<adapter>:fast-only` for comparisons."
    )
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])  # fmt: skip
    ray = parser.add_argument_group("Ray Serve (scale-out; needs `ray[serve]`)")
    ray.add_argument("--ray", action="store_true", help="Serve with Ray Serve: --replicas copies of the model.")
    ray.add_argument("--replicas", type=int, help="Model replicas with --ray (default 2).")
    ray.add_argument(
        "--ray-address", help="Join this Ray cluster (e.g. auto or ray://host:10001); default: a local one."
    )
    ray.add_argument(
        "--replica-cpus", type=float, help="CPUs (and torch threads) per replica (default: the cluster's / replicas)."
    )
    ray.add_argument("--batch-wait-ms", type=float, help="How long a replica waits for a batch to fill (default 10).")
    ray.add_argument(
        "--no-video-routing",
        action="store_true",
        help="Route by load alone (default: questions about a video go to the replica that encoded it).",
    )


def engine_arguments(args: argparse.Namespace) -> dict:
    """`Engine.load` keyword arguments from parsed `serve` arguments, checked."""
    from ..inference.engine import EngineSettings  # (the CLI's other commands do not import torch for this module)

    for name in ("port", "max_frames", "max_batch_size", "max_tokens", "num_frames", "max_model_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if args.max_media_mb <= 0 or args.cache_gb < 0:
        raise ServeError("--max-media-mb must be > 0 and --cache-gb >= 0.")
    for root in args.media_root:
        if not Path(root).is_dir():
            raise ServeError(f"--media-root {root} is not a folder.")
    settings = EngineSettings(
        num_frames=args.num_frames,
        cache_bytes=int(args.cache_gb * 2**30),
        max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len,
        default_max_tokens=args.max_tokens,
        expose_baselines=args.expose_baselines,
    )
    return {
        "base": args.base,
        "adapters": adapter_map(args.adapter),
        "device": args.device,
        "dtype": args.dtype,
        "settings": settings,
        "media_roots": tuple(args.media_root),
        "allow_remote": args.allow_remote_media,
        "max_bytes": int(args.max_media_mb * 2**20),
        "max_frames": args.max_frames,
    }


def check_ray_arguments(args: argparse.Namespace) -> None:
    """Refuse Ray options without `--ray` and out-of-range values (before anything is loaded); fill in the
    defaults of the unset ones."""
    given = [name for name in RAY_OPTIONS if getattr(args, name) not in (None, False)]
    if not args.ray and given:
        raise ServeError(f"--{given[0].replace('_', '-')} needs --ray.")
    args.replicas = 2 if args.replicas is None else args.replicas
    args.batch_wait_ms = 10.0 if args.batch_wait_ms is None else args.batch_wait_ms
    if args.replicas < 1:
        raise ServeError(f"--replicas must be >= 1, got {args.replicas}.")
    if args.replica_cpus is not None and args.replica_cpus <= 0:
        raise ServeError(f"--replica-cpus must be > 0, got {args.replica_cpus}.")
    if args.batch_wait_ms < 0:
        raise ServeError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}.")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn

    from ..inference.engine import Engine
    from .app import create_app

    check_ray_arguments(args)
    load = engine_arguments(args)
    if args.ray:
        return run_ray(args, load)
    engine = Engine.load(**load)
    print(f"serving {engine.model_ids} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


def run_ray(args: argparse.Namespace, load: dict) -> int:
    """Serve on Ray Serve (`serve/ray_app.py`) until interrupted (Ctrl-C or SIGTERM), then stop the deployment."""
    import signal

    try:
        from . import ray_app
    except ImportError as err:
        raise ServeError(f"--ray needs Ray Serve: pip install 'slowfast-adapter[serve]' ({err}).") from err

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    where = args.ray_address or "a local Ray cluster"
    print(f"starting {args.replicas} replica(s) on {where}...", flush=True)
    try:
        ray_app.start(
            load,
            replicas=args.replicas,
            host=args.host,
            port=args.port,
            address=args.ray_address,
            cpus_per_replica=args.replica_cpus,
            route_by_video=not args.no_video_routing,
            batch_wait_s=args.batch_wait_ms / 1000,
        )
        print(f"serving {sorted(load['adapters'])} on http://{args.host}:{args.port}/v1 (Ray Serve, "
              f"{args.replicas} replicas)", flush=True)  # fmt: skip
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except ray_app.ClusterTooSmall as err:
        raise ServeError(str(err)) from err
    finally:
        ray_app.shutdown(joined=bool(args.ray_address))
