"""GPU benchmark: the 7B slow-fast model end to end on one accelerator (random weights).

Builds a random-weight LLaVA-Video-7B (the shipped config `llava-video-7b-qwen2`: Qwen2-7B decoder, SigLIP at
384 px, 196 video tokens per frame) directly on `--device` in `--dtype` (bf16), attention "flash_attention_2"
where `flash_attn` is importable on CUDA, else "sdpa", and measures:

1. prefill (one forward, last-token logits): base at 16 frames vs slow-fast at 128, end to end (vision tower
   included) and LLM only (video features computed before the timed call, as in benchmarks/prefill.py);
2. one decode step: the base at 16 frames, slow-fast at 128 with the slow K/V cached (ours) and re-projected
   at every step (`inspection.reprojecting_slow_kv`, the reference's behaviour); every step runs on the
   KV cache cropped back to the prompt. Then both through `generate` with the static cache, eager and compiled
   (transformers' own compiled step, fullgraph, `--compile-backend`), each decode step timed inside the loop
   (benchmarks/common.py `timed_generate`); compiled tokens must equal eager's and the timed call must compile
   nothing new;
3. one adapter training step at 64 frames: forward + backward + AdamW on the trainable parameters, gradient
   checkpointing on (time and peak memory);
4. peak memory of one whole `generate` (prefill + `--new-tokens` tokens) at 128, 512 and 1,536 frames,
   slow-fast and the base with all its native video tokens (an out-of-memory is recorded as "OOM").

Slow-fast pooling at F frames keeps `--base-frames` fast frames, as the paper's released configs do (16 fast
frames: temporal pooling 4, sampling F / 64); `--slowfast key=value` overrides any `SlowFastConfig` field.
Inputs are what the stock processor returns, built directly: random normalised pixels [1, F, 3, 384, 384] and
input_ids with F x 196 + 1 video placeholders (every frame's grid and one newline token) in ~100 text tokens.

Every measurement checks that the path it times ran and records the evidence under `ran`: slow-fast calls
count their K/V projections and slow reads per step (`slowfast_adapter.core.inspection.recording()`), base calls must
create no slow context at all. Each measurement has its own try/except: an error is recorded in the JSON and
the run goes on; the JSON is rewritten after every measurement (a killed run keeps what it measured). Exit
status 1 if any measurement failed or was skipped by the time guard (`--time-limit`; an OOM is a result, not a
failure), 2 if the installed transformers is outside what slowfast-adapter's fence accepts.

    python benchmarks/gpu.py                              # 7B config on cuda -> benchmarks/results/gpu.json
    python benchmarks/gpu.py --tiny --device cpu          # tiny config on the CPU, seconds
    python benchmarks/gpu.py --slowfast min_fast_frames=8 # any SlowFastConfig override
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import timed_generate  # noqa: E402

from slowfast_adapter import SlowFastConfig, __version__, wrap  # noqa: E402
from slowfast_adapter.core import inspection, state, surface
from slowfast_adapter.families import family_for  # noqa: E402

MODEL_CONFIG = "llava-video-7b-qwen2"
MIB = 2**20
TINY_OVERRIDES = {"hybrid_layer_interval": 2}  # the tiny decoder has 4 layers: hybrid layers 0 and 2


# ------------------------------------------------------------------------------------------- settings
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model (slowfast_adapter.tools.tiny), CPU seconds"
    )
    parser.add_argument("--device", default=None, help="cuda (default where available) or cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="bfloat16 (default on CUDA), float32 (on the CPU)"
    )
    parser.add_argument(
        "--attn",
        choices=["auto", "sdpa", "eager", "flash_attention_2"],
        default="auto",
        help="attention implementation (auto: flash_attention_2 where flash_attn imports on CUDA)",
    )
    parser.add_argument("--frames", type=int, nargs="+", help="generate peak-memory frame counts (128 512 1536)")
    parser.add_argument("--base-frames", type=int, help="base frames for prefill/decode = fast frames (16)")
    parser.add_argument("--slowfast-frames", type=int, help="slow-fast frames for prefill/decode (128)")
    parser.add_argument("--train-frames", type=int, help="frames of the training step (64)")
    parser.add_argument(
        "--slowfast",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SlowFastConfig override (value parsed as JSON, else a string); repeatable",
    )
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens around the video")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per setting (after 1 warm-up)")
    parser.add_argument("--decode-steps", type=int, default=10, help="timed decode steps (after 2 warm-ups)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled decode "
                        "step (inductor; eager: Dynamo only, for smoke runs)")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (after 1 warm-up)")
    parser.add_argument("--new-tokens", type=int, default=4, help="new tokens of each generate")
    parser.add_argument("--text-layers", type=int, help="shrink the decoder to this many layers (smoke runs)")
    parser.add_argument("--vision-layers", type=int, help="shrink the vision tower to this many layers")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run (480; --tiny 120): later "
                        "measurements, or ones estimated not to fit, are skipped")  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON path (benchmarks/results/gpu.json; --tiny: gpu_tiny.json)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(frames=[32, 64, 128] if tiny else [128, 512, 1536], base_frames=4 if tiny else 16,
                    slowfast_frames=32 if tiny else 128, train_frames=16 if tiny else 64,
                    time_limit=120.0 if tiny else 480.0,
                    out=Path(__file__).parent / "results" / ("gpu_tiny.json" if tiny else "gpu.json"))  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:  # bf16 matmuls on the CPU are ~25x slower than fp32 here (a tiny forward: 1 s vs 40 ms)
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    args.overrides = {**(TINY_OVERRIDES if tiny else {}), **parse_overrides(parser, args.slowfast)}
    try:
        slowfast_config(args, args.slowfast_frames)
    except (TypeError, ValueError) as err:
        parser.error(f"--slowfast: {err} (fields: {', '.join(f.name for f in fields(SlowFastConfig))})")
    return args


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--slowfast takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def slowfast_config(args: argparse.Namespace, frames: int) -> SlowFastConfig:
    """`--base-frames` fast frames from `frames` (temporal pooling 4, sampling the rest), then the overrides."""
    sampling = max(1, frames // (4 * args.base_frames))
    values = dict(temporal_sampling_stride=sampling, temporal_pooling_stride=4, min_fast_frames=args.base_frames)
    return SlowFastConfig(**{**values, **args.overrides})


def attention_implementation(args: argparse.Namespace) -> tuple[str, str]:
    """(implementation, why)."""
    if args.attn != "auto":
        return args.attn, "--attn"
    if torch.device(args.device).type != "cuda":
        return "sdpa", "not CUDA"
    try:
        import flash_attn  # noqa: F401
        from transformers.utils import is_flash_attn_2_available
    except Exception as err:  # noqa: BLE001 - a broken flash_attn install is reported, not fatal
        return "sdpa", f"flash_attn does not import: {type(err).__name__}: {err}"[:300]
    if not is_flash_attn_2_available():
        return "sdpa", "transformers says flash_attn 2 is unavailable"
    return "flash_attention_2", "flash_attn imports"


def check_fence() -> str | None:
    """None, or why slowfast-adapter's fence (slowfast_adapter.core.surface) refuses this transformers: wraps a tiny
    model (a second, before any minutes are spent building the 7B one)."""
    import transformers

    from slowfast_adapter.tools.tiny import build_tiny_llava_onevision

    installed = f"transformers {transformers.__version__} (slowfast-adapter is tested on {surface.TESTED_TRANSFORMERS})"
    try:
        tiny = build_tiny_llava_onevision(num_layers=1)[0]
    except Exception as err:  # noqa: BLE001 - say which release broke what
        return f"cannot build the tiny model that checks the fence with {installed}: {type(err).__name__}: {err}"
    try:
        wrap(tiny).unwrap()
    except surface.SurfaceError as err:
        return f"slowfast-adapter's fence refuses {installed}: {err}"
    return None


# ---------------------------------------------------------------------------------------- model, inputs
def build_base(args: argparse.Namespace, attn: str) -> torch.nn.Module:
    """The random base model, initialised directly on the device in the benchmark dtype, eval mode."""
    from transformers import AutoModelForImageTextToText

    from slowfast_adapter.tools import flops
    from slowfast_adapter.tools.tiny import build_tiny_llava_onevision

    config = build_tiny_llava_onevision()[0].config if args.tiny else flops.load_config(MODEL_CONFIG)
    config = copy.deepcopy(config)
    if args.text_layers:
        config.text_config.num_hidden_layers = args.text_layers
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = config.text_config.layer_types[: args.text_layers]
    if args.vision_layers:
        config.vision_config.num_hidden_layers = args.vision_layers
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation=attn
        )
    if family_for(model).name != "llava_onevision":
        raise ValueError("benchmarks/gpu.py builds LLaVA-OneVision inputs only")
    return model.eval()


def video_inputs(model: torch.nn.Module, frames: int, text_tokens: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the stock LLaVA-OneVision processor returns for one video and a question, built directly:
    pixel_values_videos [1, frames, 3, S, S] (random normalised pixels) and input_ids with frames x h x w + 1
    video placeholders (every frame's token grid and the newline token) between random text tokens."""
    config, device = model.config, model.device
    height, width = family_for(model).video_grid(model)
    text = model.config.get_text_config()
    special = {config.video_token_id, config.image_token_id}
    for value in (text.bos_token_id, text.eos_token_id, text.pad_token_id):
        special |= set(value) if isinstance(value, list) else {value}
    special.discard(None)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.vocab_size, (text_tokens,), generator=generator)
    ids[torch.isin(ids, torch.tensor(sorted(special)))] = next(i for i in range(text.vocab_size) if i not in special)
    video = torch.full((frames * height * width + 1,), config.video_token_id)
    input_ids = torch.cat([ids[:4], video, ids[4:]])[None].to(device)
    size = config.vision_config.image_size
    torch.manual_seed(seed)
    pixels = torch.randn(1, frames, 3, size, size, device=device, dtype=model.dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": pixels}


@contextmanager
def wrapped(base: torch.nn.Module, config: SlowFastConfig) -> Iterator[Any]:
    model = wrap(base, config)
    try:
        yield model
    finally:
        model.unwrap()


# ---------------------------------------------------------------------------------------- time, memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int) -> list[float]:
    """Seconds of `repeats` calls of fn after `warmup` calls (the device synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[dict[str, float], Any]:
    """({"peak_mib", "peak_above_start_mib", "before_mib"}, fn()). CUDA: torch.cuda.max_memory_allocated after
    reset_peak_memory_stats; CPU: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "peak_mib": peak / MIB,
            "peak_above_start_mib": (peak - before) / MIB,
            "before_mib": before / MIB,
        }, result
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    result = fn()
    peak = _status_mib("VmHWM")
    return {"peak_mib": peak, "peak_above_start_mib": peak - before, "before_mib": before}, result


def slow_stats(contexts: list[state.SlowContext]) -> dict[str, int]:
    """The counters of every slow context created in a call (see `inspection.recording()`)."""
    totals = {"contexts": len(contexts), "steps": 0, "slow_reads": 0, "kv_projections": 0}
    for context in contexts:
        for key in ("steps", "slow_reads", "kv_projections"):
            totals[key] += context.counters.totals()[key]
    return totals


# ------------------------------------------------------------------------------------------ the runner
def where(err: BaseException, frames: int = 6) -> list[str]:
    """The innermost `frames` frames of an exception's traceback, "file:line function" (which module ran out of
    memory: the vision tower or the LLM)."""
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(err.__traceback__)[-frames:]]


class Benchmark:
    """Runs measurements one by one, each in its own try/except, and rewrites the JSON after each."""

    def __init__(self, args: argparse.Namespace, header: dict[str, Any]) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {
            **header,
            "prefill": {},
            "decode": {},
            "train": {},
            "memory": {},
            "ratios": {},
            "ran": {},
            "errors": {},
            "skipped": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def measure(self, section: str, name: str, fn: Callable[[dict], tuple[bool, dict]], *, estimate_s=None) -> dict:
        """Run fn(entry): it fills `entry` with numbers and returns (the path ran, evidence). An OOM is recorded
        as the entry's result ("OOM") in the memory section and as an error elsewhere."""
        key, entry = f"{section}.{name}", {}
        self.data[section][name] = entry
        left = self.args.time_limit - self.elapsed()
        if left <= 0 or (estimate_s is not None and estimate_s > left):
            estimate = "" if estimate_s is None else f", estimated {estimate_s:.0f} s"
            self.data["skipped"][key] = (
                f"time guard: {max(left, 0):.0f} s left of {self.args.time_limit:.0f} s{estimate}"
            )
            print(f"[{self.elapsed():6.1f} s] {key}: SKIPPED ({self.data['skipped'][key]})", flush=True)
            self.write()
            return entry
        print(f"[{self.elapsed():6.1f} s] {key} ...", flush=True)
        start = time.perf_counter()
        try:
            ok, evidence = fn(entry)
            self.data["ran"][key] = {"ok": bool(ok), **evidence}
            if not ok:
                self.data["errors"][key] = f"the path this measurement times did not run: {evidence}"
        except torch.OutOfMemoryError as err:
            entry["result"] = "OOM"
            entry["oom"] = str(err).splitlines()[0][:500]
            entry["where"] = where(err)
            if section != "memory":
                self.data["errors"][key] = f"OOM: {entry['oom']}"
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            entry["where"] = where(err)
            self.data["errors"][key] = f"{type(err).__name__}: {err}"[:2000]
        finally:
            entry["wall_s"] = time.perf_counter() - start
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.write()
        status = "OOM" if entry.get("result") == "OOM" else "error" if key in self.data["errors"] else "ok"
        print(f"[{self.elapsed():6.1f} s] {key}: {status} ({entry['wall_s']:.1f} s)", flush=True)
        return entry

    def write(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        self.data["ok"] = not self.data["errors"] and not self.data["skipped"]
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------- measurements
def measure_prefill(bench: Benchmark, base: torch.nn.Module) -> None:
    args, device = bench.args, bench.device
    native_inputs = video_inputs(base, args.base_frames, args.text_tokens)
    slow_inputs = video_inputs(base, args.slowfast_frames, args.text_tokens)
    config = slowfast_config(args, args.slowfast_frames)

    def base_end_to_end(entry: dict) -> tuple[bool, dict]:
        with torch.no_grad(), inspection.recording() as contexts:
            times = timed(lambda: base(**native_inputs, logits_to_keep=1), device, repeats=args.repeats, warmup=1)
        entry.update(frames=args.base_frames, llm_tokens=native_inputs["input_ids"].shape[1], slow_tokens=0)
        entry.update(summary(times))
        return not contexts, {"slow_contexts": len(contexts)}

    def base_llm_only(entry: dict) -> tuple[bool, dict]:
        native = SlowFastConfig(temporal_pooling_stride=1, min_fast_frames=args.base_frames)  # fast = native
        with torch.no_grad(), inspection.recording() as contexts:
            prepared = family_for(base).prepare(base, native, native_inputs)  # vision tower: not timed
            times = timed(lambda: base(**prepared.model_inputs, logits_to_keep=1), device, repeats=args.repeats,
                          warmup=1)  # fmt: skip
        entry.update(frames=args.base_frames, llm_tokens=prepared.input_ids.shape[1], slow_tokens=0)
        entry.update(summary(times))
        native_length = native_inputs["input_ids"].shape[1]
        return not contexts and entry["llm_tokens"] == native_length, {"slow_contexts": len(contexts)}

    def slowfast_end_to_end(entry: dict) -> tuple[bool, dict]:
        calls, tokens = [], {}
        with wrapped(base, config) as model, torch.no_grad():
            layers = len(model.hybrid_layer_indices)

            def call() -> None:
                with inspection.recording() as contexts:
                    model(**slow_inputs, logits_to_keep=1)
                calls.append(slow_stats(contexts))
                tokens.update(
                    llm_tokens=contexts[0].prompt_query_mask.shape[1], slow_tokens=contexts[0].slow.mask.sum()
                )

            times = timed(call, device, repeats=args.repeats, warmup=1)
        entry.update(
            frames=args.slowfast_frames, llm_tokens=tokens["llm_tokens"], slow_tokens=int(tokens["slow_tokens"])
        )
        entry.update(summary(times))
        expected = {"contexts": 1, "steps": 1, "slow_reads": layers, "kv_projections": layers}
        return all(c == expected for c in calls), {"hybrid_layers": layers, "per_call": calls[-1], "calls": len(calls)}

    def slowfast_llm_only(entry: dict) -> tuple[bool, dict]:
        calls = []
        with wrapped(base, config) as model, torch.no_grad():
            layers = len(model.hybrid_layer_indices)
            prepared = model.prepare_inputs(**slow_inputs)  # vision tower and pooling: not timed

            def call() -> None:  # the slow K/V projection + the LLM forward with the hybrid layers active
                context = model.slow_context(prepared)
                with state.activated(context):
                    base(**prepared.model_inputs, logits_to_keep=1)
                calls.append(context.counters.totals())

            times = timed(call, device, repeats=args.repeats, warmup=1)
        entry.update(frames=args.slowfast_frames, llm_tokens=prepared.input_ids.shape[1],
                     slow_tokens=int(prepared.slow.mask.sum()), **summary(times))  # fmt: skip
        expected = {"steps": 1, "slow_reads": layers, "kv_projections": layers}
        return all(c == expected for c in calls), {"hybrid_layers": layers, "per_call": calls[-1], "calls": len(calls)}

    bench.measure("prefill", "base", base_end_to_end)
    bench.measure("prefill", "slowfast", slowfast_end_to_end)
    bench.measure("prefill", "base_llm", base_llm_only)
    bench.measure("prefill", "slowfast_llm", slowfast_llm_only)


def decode_steps(base, cache, context, device, *, steps: int, warmup: int) -> tuple[list[float], list[dict]]:
    """Seconds of single-token decode steps on `cache`, each cropped back to the prompt afterwards (every step
    sees the same cache length), and the slow counters' change in each step (None without a context)."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    cache_kwarg = surface.cache_kwarg(base)
    times, deltas = [], []
    for index in range(warmup + steps):
        before = context.counters.totals() if context is not None else None
        with inspection.recording() as created:
            synchronize(device)
            start = time.perf_counter()
            with state.activated(context):
                base(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
            synchronize(device)
            elapsed = time.perf_counter() - start
        cache.crop(-1)
        delta = {"slow_contexts_created": len(created)}
        if context is not None:
            delta.update(
                {k: context.counters.totals()[k] - before[k] for k in ("steps", "slow_reads", "kv_projections")}
            )
        deltas.append(delta)
        if index >= warmup:
            times.append(elapsed)
    return times, deltas


def measure_decode(bench: Benchmark, base: torch.nn.Module) -> None:
    args, device = bench.args, bench.device
    steps, warmup = args.decode_steps, 2
    native_inputs = video_inputs(base, args.base_frames, args.text_tokens)
    slow_inputs = video_inputs(base, args.slowfast_frames, args.text_tokens)
    config = slowfast_config(args, args.slowfast_frames)

    def base_step(entry: dict) -> tuple[bool, dict]:
        with torch.no_grad():
            cache = surface.output_cache(base(**native_inputs, use_cache=True, logits_to_keep=1))
            times, deltas = decode_steps(base, cache, None, device, steps=steps, warmup=warmup)
        entry.update(frames=args.base_frames, llm_tokens=native_inputs["input_ids"].shape[1], slow_tokens=0)
        entry.update(summary(times))
        return all(d == {"slow_contexts_created": 0} for d in deltas), {"steps": len(deltas), "per_step": deltas[-1]}

    def slowfast_step(reproject: bool) -> Callable[[dict], tuple[bool, dict]]:
        def run(entry: dict) -> tuple[bool, dict]:
            with wrapped(base, config) as model, torch.no_grad():
                layers = len(model.hybrid_layer_indices)
                prepared = model.prepare_inputs(**slow_inputs)
                context = model.slow_context(prepared)  # slow K/V projected once (cached mode)
                with state.activated(context):  # the prefill that fills the KV cache (not timed)
                    cache = surface.output_cache(base(**prepared.model_inputs, use_cache=True, logits_to_keep=1))
                if reproject:
                    with inspection.reprojecting_slow_kv(model):  # every step projects the slow K/V again
                        context = model.slow_context(prepared)
                times, deltas = decode_steps(base, cache, context, device, steps=steps, warmup=warmup)
            entry.update(frames=args.slowfast_frames, llm_tokens=prepared.input_ids.shape[1],
                         slow_tokens=int(prepared.slow.mask.sum()), **summary(times))  # fmt: skip
            per_step = {"slow_contexts_created": 0, "steps": 1, "slow_reads": layers,
                        "kv_projections": layers if reproject else 0}  # fmt: skip
            total = (warmup + steps) * layers if reproject else layers
            ok = all(d == per_step for d in deltas) and context.counters.kv_projections == total
            evidence = {"hybrid_layers": layers, "steps": len(deltas), "per_step": deltas[-1],
                        "kv_projections_total": context.counters.kv_projections, "expected_total": total}  # fmt: skip
            return ok, evidence

        return run

    def generated(model: Any, inputs: dict, compiled: bool) -> tuple[torch.Tensor, list[float], dict]:
        """transformers' static-cache decode loop, eager or compiled (what it compiles by itself on CUDA): a warm-up
        call (compiles), then one call whose decode steps are timed; the graphs Dynamo made in the timed call."""
        from transformers import CompileConfig

        counters = surface.dynamo_counters()

        eos = base.config.get_text_config().eos_token_id
        kwargs: dict[str, Any] = {
            "cache_implementation": "static",
            "pad_token_id": (eos[0] if isinstance(eos, list) else eos) or 0,
        }
        if compiled:
            config = CompileConfig(fullgraph=True, dynamic=False, backend=args.compile_backend, mode="default")
            kwargs["compile_config"] = surface.compile_on_every_device(config)  # CPU smoke runs too
        timed_generate(model, inputs, 3, **kwargs)
        counters.clear()
        sequences, times = timed_generate(model, inputs, steps + 1, **kwargs)
        made = {
            "graphs_made": counters["stats"].get("unique_graphs", 0),
            "recompiles": sum(counters["recompiles"].values()),
        }
        return sequences, times, made

    def static_step(kind: str) -> Callable[[dict], tuple[bool, dict]]:
        """`kind`: base or slowfast; the compiled step's tokens must equal the eager static-cache run's, and the
        timed compiled call must make no new graph (no recompile per token)."""

        def run(entry: dict) -> tuple[bool, dict]:
            inputs = native_inputs if kind == "base" else slow_inputs
            with wrapped(base, config) if kind == "slowfast" else contextlib.nullcontext(base) as model:
                with torch.no_grad(), inspection.recording() as contexts:
                    eager, eager_times, _ = generated(model, inputs, compiled=False)
                    compiled, times, graphs = generated(model, inputs, compiled=True)
            entry.update(frames=args.base_frames if kind == "base" else args.slowfast_frames,
                         llm_tokens=inputs["input_ids"].shape[1], slow_tokens=0, **summary(times),
                         eager_static_median_s=statistics.median(eager_times))  # fmt: skip
            if kind == "slowfast":
                entry.update(llm_tokens=contexts[0].prompt_query_mask.shape[1],
                             slow_tokens=int(contexts[0].slow.mask.sum()))  # fmt: skip
            same = torch.equal(eager, compiled)
            ok = (
                same and graphs["graphs_made"] == 0 and graphs["recompiles"] == 0 and (kind == "base") == (not contexts)
            )
            return ok, {"tokens_equal_eager": same, "timed_call": graphs, "backend": args.compile_backend,
                        "slow_contexts": len(contexts)}  # fmt: skip

        return run

    bench.measure("decode", "base", base_step)
    bench.measure("decode", "slowfast_cached", slowfast_step(reproject=False))
    bench.measure("decode", "slowfast_reprojected", slowfast_step(reproject=True))
    bench.measure("decode", "base_compiled", static_step("base"))
    bench.measure("decode", "slowfast_compiled", static_step("slowfast"))


def measure_train(bench: Benchmark, base: torch.nn.Module) -> None:
    args, device = bench.args, bench.device
    frames = args.train_frames

    def train(entry: dict) -> tuple[bool, dict]:
        inputs = video_inputs(base, frames, args.text_tokens)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == base.config.video_token_id, -100)
        model = wrap(base, slowfast_config(args, frames))
        steps: list[dict] = []
        try:
            layers = len(model.hybrid_layer_indices)
            model.gradient_checkpointing_enable()
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            gates = [branch.attn_gate for branch in model.slow_branches.values()]
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def step() -> None:
                with inspection.recording() as contexts:
                    loss = model(**inputs, labels=labels).loss
                    loss.backward()
                record = {**slow_stats(contexts), "missing_grads": sum(p.grad is None for p in params)}
                record["llm_tokens"] = contexts[0].prompt_query_mask.shape[1] if contexts else 0
                record["slow_tokens"] = contexts[0].slow.mask.sum() if contexts else 0
                # alpha starts at 0, so only its gradient is non-zero on the first step: it proves the slow path
                # is in the graph. Kept as tensors here (no device sync inside the timed step).
                record["gate_grad"] = [g.grad.detach().abs() for g in gates if g.grad is not None]
                record["loss"] = loss.detach()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps.append(record)

            step()  # warm-up (AdamW state allocated here)
            memory, times = peak_memory(lambda: timed(step, device, repeats=args.train_steps, warmup=0), device)
            moved = all(float(g.detach()) != 0 for g in gates)  # the steps moved every alpha off 0 (NaN: moved)
        finally:
            model.unwrap()
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
            base.eval()
        for record in steps:
            record["gate_grad"] = [float(g) for g in record["gate_grad"]]
            record["loss"], record["slow_tokens"] = float(record["loss"]), int(record["slow_tokens"])
        entry.update(frames=frames, llm_tokens=steps[-1]["llm_tokens"], slow_tokens=steps[-1]["slow_tokens"],
                     trainable_parameters=sum(p.numel() for p in params), loss=steps[-1]["loss"], **summary(times),
                     **memory)  # fmt: skip
        ok = moved and all(
            s["contexts"] == 1 and s["kv_projections"] == layers and s["slow_reads"] >= layers
            and s["missing_grads"] == 0 and len(s["gate_grad"]) == layers and all(g != 0 for g in s["gate_grad"])
            for s in steps
        )  # fmt: skip
        evidence = {"hybrid_layers": layers, "steps": len(steps), "per_step": steps[-1], "gates_moved": moved,
                    "gradient_checkpointing": True}  # fmt: skip
        return ok, evidence

    bench.measure("train", f"slowfast_{frames}", train)


def measure_memory(bench: Benchmark, base: torch.nn.Module) -> None:
    args, device = bench.args, bench.device
    n = args.new_tokens
    eos = base.config.get_text_config().eos_token_id
    generation = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=(eos[0] if isinstance(eos, list) else eos) or 0)  # fmt: skip

    def slowfast(frames: int) -> Callable[[dict], tuple[bool, dict]]:
        def run(entry: dict) -> tuple[bool, dict]:
            inputs = video_inputs(base, frames, args.text_tokens)
            prompt = inputs["input_ids"].shape[1]
            with wrapped(base, slowfast_config(args, frames)) as model:
                layers = len(model.hybrid_layer_indices)
                with inspection.recording() as contexts:
                    memory, output = peak_memory(lambda: model.generate(**inputs, **generation), device)
                entry.update(frames=frames, **memory)
                if contexts:
                    entry.update(llm_tokens=contexts[0].prompt_query_mask.shape[1],
                                 slow_tokens=int(contexts[0].slow.mask.sum()))  # fmt: skip
                stats = slow_stats(contexts)
                read_steps = sorted(
                    {step for context in contexts for step, _, rows in context.counters.reads if rows.min() > 0}
                )
            expected = {"contexts": 1, "steps": n, "slow_reads": n * layers, "kv_projections": layers}
            ok = stats == expected and read_steps == list(range(1, n + 1)) and output.shape[1] == prompt + n
            return ok, {"hybrid_layers": layers, **stats, "steps_with_slow_reads": read_steps, "new_tokens": n}

        return run

    def native(frames: int) -> Callable[[dict], tuple[bool, dict]]:
        def run(entry: dict) -> tuple[bool, dict]:
            inputs = video_inputs(base, frames, args.text_tokens)
            prompt = inputs["input_ids"].shape[1]
            entry.update(frames=frames, llm_tokens=prompt, slow_tokens=0)
            with inspection.recording() as contexts:
                memory, output = peak_memory(lambda: base.generate(**inputs, **generation), device)
            entry.update(memory)
            return not contexts and output.shape[1] == prompt + n, {"slow_contexts": len(contexts), "new_tokens": n}

        return run

    for kind, make, power in (("slowfast", slowfast, 1), ("base", native, 2)):
        last = None  # (frames, seconds) of the previous setting that completed: the time estimate scales from it
        for frames in args.frames:
            estimate = None if last is None else last[1] * (frames / last[0]) ** power
            entry = bench.measure("memory", f"{kind}_{frames}", make(frames), estimate_s=estimate)
            if "peak_mib" in entry:
                last = (frames, entry["wall_s"])


# --------------------------------------------------------------------------------------------- report
def ratios(data: dict[str, Any]) -> dict[str, float]:
    def median(section: str, name: str) -> float | None:
        return data[section].get(name, {}).get("median_s")

    out = {}
    pairs = {
        "prefill_slowfast_over_base": ("prefill", "slowfast", "base"),
        "prefill_llm_slowfast_over_base": ("prefill", "slowfast_llm", "base_llm"),
        "decode_cached_over_base": ("decode", "slowfast_cached", "base"),
        "decode_reprojected_over_base": ("decode", "slowfast_reprojected", "base"),
        "decode_reprojected_over_cached": ("decode", "slowfast_reprojected", "slowfast_cached"),
        "decode_compiled_slowfast_over_base": ("decode", "slowfast_compiled", "base_compiled"),
        "decode_compiled_over_eager_slowfast": ("decode", "slowfast_compiled", "slowfast_cached"),
    }
    for key, (section, a, b) in pairs.items():
        if median(section, a) and median(section, b):
            out[key] = median(section, a) / median(section, b)
    for name, entry in data["memory"].items():
        if name.startswith("slowfast_") and "peak_mib" in entry:
            native = data["memory"].get(name.replace("slowfast_", "base_"), {})
            if "peak_mib" in native:
                out[f"memory_{entry['frames']}_slowfast_over_base"] = entry["peak_mib"] / native["peak_mib"]
    return out


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Slow-fast on {data['device']} ({data['model']}, random weights)",
        "",
        f"Command: `{data['command']}`",
        "",
        f"torch {data['torch']}, transformers {data['transformers']}, slowfast-adapter {data['slowfast_adapter']}; "
        f"{data['dtype']}, attention {data['attn_implementation']} ({data['attn_note']}); hybrid layers "
        f"{data['hybrid_layers']}; peak memory: {data['memory_source']}.",
        "",
        "| measurement | frames | LLM tokens | slow tokens | time (ms, median) | peak memory (MiB) | above start |",
        "|---|---|---|---|---|---|---|",
    ]
    for section in ("prefill", "decode", "train", "memory"):
        for name, entry in data[section].items():
            key = f"{section}.{name}"
            cells = [key, entry.get("frames", "-")]
            cells += [f"{entry[k]:,}" if k in entry else "-" for k in ("llm_tokens", "slow_tokens")]
            cells.append(f"{entry['median_s'] * 1e3:,.1f}" if "median_s" in entry else "-")
            cells += [f"{entry[k]:,.0f}" if k in entry else "-" for k in ("peak_mib", "peak_above_start_mib")]
            if entry.get("result") == "OOM":
                cells[-2:] = ["OOM", "OOM"]
            elif key in data["skipped"] or key in data["errors"]:
                cells[-1] = "skipped" if key in data["skipped"] else "error"
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Ratios:", ""] + [f"- {key}: {value:.3f}" for key, value in data["ratios"].items()]
    checks = data["ran"]
    lines += ["", f"Path checks: {sum(c['ok'] for c in checks.values())} of {len(checks)} passed."]
    for key, error in {**data["errors"], **data["skipped"]}.items():
        lines.append(f"- {key}: {error.splitlines()[0][:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    device = torch.device(args.device)
    attn, attn_note = attention_implementation(args)
    header = {
        "command": " ".join(["python benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "slowfast_adapter": __version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "attn_implementation": attn,
        "attn_note": attn_note,
        "model": "tiny" if args.tiny else MODEL_CONFIG,
        "memory_source": "torch.cuda.max_memory_allocated (reset before each call; incl. the weights)"
        if device.type == "cuda"
        else "process peak RSS (VmHWM; incl. the weights)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "slowfast"},
        "slowfast_configs": {
            str(f): slowfast_config(args, f).to_dict()
            for f in sorted({args.slowfast_frames, args.train_frames, *args.frames})
        },
    }
    bench = Benchmark(args, header)
    refusal = check_fence()
    if refusal:
        bench.data["errors"]["fence"] = refusal
        bench.write()
        print(refusal, file=sys.stderr)
        return 2
    try:
        base = build_base(args, attn)
    except Exception as err:  # noqa: BLE001 - nothing else can run; say why in the JSON too
        traceback.print_exc()
        bench.data["errors"]["build"] = f"{type(err).__name__}: {err}"[:2000]
        bench.write()
        return 1
    text = base.config.text_config
    bench.data["config"] = {
        "text_layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "vision_layers": base.config.vision_config.num_hidden_layers,
        "image_size": base.config.vision_config.image_size,
        "video_tokens_per_frame": int(torch.tensor(family_for(base).video_grid(base)).prod()),
        "parameters": sum(p.numel() for p in base.parameters()),
        "build_s": bench.elapsed(),
    }
    bench.data["hybrid_layers"] = slowfast_config(args, args.slowfast_frames).resolve_hybrid_layers(
        text.num_hidden_layers
    )
    print(f"[{bench.elapsed():6.1f} s] built {bench.data['model']} on {bench.data['device']} ({attn})", flush=True)
    for section, measure in (("prefill", measure_prefill), ("decode", measure_decode), ("train", measure_train),
                             ("memory", measure_memory)):  # fmt: skip
        try:  # each measurement records its own errors; this catches the section's setup (its inputs)
            measure(bench, base)
        except Exception as err:  # noqa: BLE001 - recorded, the next section still runs
            traceback.print_exc()
            bench.data["errors"][section] = f"{type(err).__name__}: {err}"[:2000]
    bench.data["ratios"] = ratios(bench.data)
    bench.write()
    report = markdown(bench.data)
    args.out.with_suffix(".md").write_text(report + "\n")
    print(report)
    return 0 if bench.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
