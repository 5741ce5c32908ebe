"""Exact FLOP counts of a base video MLLM and its slow-fast version, without weights.

The model is built on the meta device from its `config.json` and the real modules run under
`torch.utils.flop_counter.FlopCounterMode`, which counts every matmul, convolution and attention
(2 FLOPs per multiply-add; attention counted in full, L_q x L_k, as a non-causal math kernel computes it).
Parts are counted separately, because a full VLM forward does not run on meta:

- vision tower: the family's own video feature path (tower + projector/merger) over all frames;
- LLM prefill: the language model's decoder over the sequence, plus the LM head on the last token (what
  `generate` computes); the sequence holds the native video tokens (base) or the fast tokens (slow-fast);
- hybrid branch: the slow K/V projection of every hybrid layer (the slow tokens through the layer's
  input norm and `kv_proj`), plus what the hybrid hooks add to the LLM forward (query projection,
  cross-attention, gate), counted as (wrapped LLM forward) - (base LLM forward) on the same sequence;
- decode step: one generated token after the prefill, with the slow K/V cached (ours) or re-projected
  at every step (the reference implementation's behaviour).

The hybrid hooks and Qwen vision towers compute indices from data (`.item()`, `.tolist()`). Under
`_RealIndexMetaMode` those small index tensors stay real CPU tensors while everything heavy is meta: an
op that mixes the two gets its real inputs moved to meta. So the counts come from the real code paths.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import DynamicCache

from ..config import SlowFastConfig
from ..configs import CONFIGS_DIR, SHIPPED_CONFIGS
from ..core import surface
from ..core.pooling import plan_fast_frames
from ..core.state import activated, prompt_query_mask
from ..core.types import SlowTokens, VideoLayout
from ..families import family_for

QWEN3_TIMESTAMP_TOKENS = 6
"""Qwen3-VL writes `<t seconds>` before each temporal group: about 6 tokens (`<`, digits, `.`, digit,
` seconds`, `>`) with the Qwen tokenizer; with `<|vision_start|>` / `<|vision_end|>`, 8 text tokens per group."""


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_SDPA_FLOPS = {surface.cpu_sdpa_op(): _cpu_sdpa_flop}
"""`custom_mapping` for FlopCounterMode on real CPU tensors: SDPA's CPU kernel has no formula in torch."""


# ------------------------------------------------------------------------------------------ loading
def load_config(name_or_path: str) -> Any:
    """A model config from a local folder or `config.json`, a shipped config (folder name or its Hub id),
    or a Hub id (only its `config.json` is downloaded)."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_file():
        return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    for folder, hub_id in SHIPPED_CONFIGS.items():
        if name_or_path in (folder, hub_id):
            return AutoConfig.from_pretrained(CONFIGS_DIR / folder)
    from huggingface_hub import hf_hub_download

    return AutoConfig.from_pretrained(Path(hf_hub_download(name_or_path, "config.json")).parent)


def build_meta_model(config: Any) -> nn.Module:
    """The full image-text-to-text model for `config` on the meta device (no weights, no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(copy.deepcopy(config), attn_implementation="sdpa")


class _RealIndexMetaMode(surface.TorchDispatchMode):
    """Meta execution in which small real CPU tensors (masks, indices, grids) keep their values.

    Moving a real tensor to meta is a no-op (so `.item()` / `.tolist()` on it still work), and an op with
    meta inputs gets its real inputs as meta (only their shapes matter there).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type != "meta":
            if torch.device(kwargs.get("device", args[0].device)).type == "meta":
                kwargs = {**kwargs, "device": args[0].device}
        elif any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in surface.tree_leaves((args, kwargs))):
            args, kwargs = surface.tree_map(
                lambda t: t.to("meta") if isinstance(t, torch.Tensor) and t.device.type != "meta" else t, (args, kwargs)
            )
        return func(*args, **kwargs)


def count_flops(fn: Callable[[], Any], custom_mapping: dict | None = None) -> tuple[int, Any]:
    """(FLOPs of `fn()`, its result), counted without autograd."""
    counter = FlopCounterMode(display=False, custom_mapping=custom_mapping or {})
    with torch.no_grad(), counter:
        result = fn()
    return counter.get_total_flops(), result


# ----------------------------------------------------------------------------------- token layout
@dataclass
class VideoTokens:
    """How a video of `frames` frames enters the model (one column of the report)."""

    frames: int
    layout: VideoLayout  # the family's layout of this video: units, their token grid, extra tokens
    fast_units: int  # units after temporal sampling + pooling (= units for the base model)
    visual_tokens: int  # video placeholder tokens in the LLM sequence
    structure_tokens: int  # non-visual tokens the video adds to the sequence (Qwen3-VL timestamps)
    slow_tokens: int  # 0 for the base model

    @property
    def units(self) -> int:
        """Frames (LLaVA) or temporal groups of frames (Qwen) the vision tower encodes."""
        return self.layout.units

    @property
    def grid(self) -> tuple[int, int]:
        """Native video tokens per unit (h, w) after the base's own pooling / merging."""
        return self.layout.grid


def video_tokens(
    model: nn.Module,
    frames: int,
    slowfast: SlowFastConfig | None,
    *,
    image_size: int | None = None,
    qwen3_timestamp_tokens: int = QWEN3_TIMESTAMP_TOKENS,
) -> VideoTokens:
    """Token counts of one square video of `frames` frames, for the base (`slowfast` None) or slow-fast."""
    layout = family_for(model).video_layout(
        model, frames, image_size=image_size, timestamp_tokens=qwen3_timestamp_tokens
    )
    units, grid = layout.units, layout.grid
    native = units * grid[0] * grid[1]
    if slowfast is None:  # the base model: every unit at its native tokens, no slow tokens
        fast_units, fast, slow = units, native, 0
    else:
        plan = plan_fast_frames(units, slowfast, unit=layout.unit_name)
        fast_units, fast, slow = plan.num_fast_frames, plan.num_fast_tokens(*grid), native
    text_per_unit = layout.text_tokens_per_unit
    return VideoTokens(frames, layout, fast_units, fast + layout.newline_tokens, fast_units * text_per_unit, slow)


# ------------------------------------------------------------------------------------------ counting
def count_vision(model: nn.Module, tokens: VideoTokens, *, direct: bool = False) -> int:
    """FLOPs of the family's video feature path (vision tower + projector/merger) for one video.

    LLaVA-OneVision runs all frames as one meta batch. Qwen towers attend within each temporal group
    (Qwen2.5-VL: within windows of a group) and loop over the groups in Python, so a long video is slow
    to count op by op: unless `direct`, f(n) = f(1) + (n - 1) * (f(2) - f(1)) groups, which is exact
    because every group runs the same ops on the same shapes (checked against direct counts in tests).
    """
    family = family_for(model)
    if family.vision_cost_per_unit and not direct and tokens.units > 2:
        smaller = [replace(tokens, layout=replace(tokens.layout, units=n)) for n in (1, 2)]
        one, two = (count_vision(model, small, direct=True) for small in smaller)
        return one + (tokens.units - 1) * (two - one)
    with _RealIndexMetaMode():
        return count_flops(lambda: family.encode_meta_video(model, tokens.layout))[0]


@dataclass
class LanguageCounts:
    prefill: int  # decoder over the sequence + LM head on the last token
    decode_step: int  # one more token with the KV cache of the prefill
    slow_kv_projection: int = 0  # the hybrid layers' slow K/V projection, once per call


def count_language_model(
    model: nn.Module,
    sequence_length: int,
    *,
    query_mask: torch.Tensor | None = None,
    slow_tokens: int = 0,
    reproject_slow_kv: bool = False,
    cached_prefix: int = 0,
) -> LanguageCounts:
    """FLOPs of the LLM over one sequence of `sequence_length` tokens and of one decode step after it.

    `model` is a meta `SlowFastModel`. With `slow_tokens` > 0 its hybrid hooks run: query_mask [L] bool
    says which prompt tokens query the slow tokens (generated tokens always do). cached_prefix: the first tokens
    come from a prompt-prefix KV cache (`SlowFastModel.encode`): they run uncounted, the prefill counts the rest.
    """
    base = model.base_model
    text = model.family.text_config(base)
    context = None
    kv_flops = 0
    if slow_tokens:
        slow = SlowTokens(
            torch.empty(1, slow_tokens, text.hidden_size, device="meta"), torch.ones(1, slow_tokens, dtype=torch.bool)
        )
        kv_flops, context = count_flops(
            lambda: model.slow_context_for_tokens(slow, query_mask[None], reproject_slow_kv=reproject_slow_kv)
        )
    cache = DynamicCache(config=text)

    def step(length: int) -> None:
        embeds = torch.empty(1, length, text.hidden_size, device="meta")
        hidden = surface.run_language_model(base, embeds, cache)
        base.lm_head(hidden[:, -1:])

    with _RealIndexMetaMode(), activated(context):
        if cached_prefix:
            step(cached_prefix)
        prefill = count_flops(lambda: step(sequence_length - cached_prefix))[0]
        decode = count_flops(lambda: step(1))[0]
    first = 2 if cached_prefix else 1  # the counted steps
    if context is not None:  # the counts must include the slow path: every hybrid layer read it in both steps
        reads = sorted((step, layer) for step, layer, _ in context.counters.reads if step >= first)
        expected = sorted((step, layer) for step in (first, first + 1) for layer in model.hybrid_layer_indices)
        if reads != expected or context.counters.steps != first + 1:
            raise RuntimeError(f"The hybrid layers did not read the slow tokens in both counted steps: {reads}.")
    return LanguageCounts(prefill, decode, kv_flops)


# -------------------------------------------------------------------------------------------- report
@dataclass
class Column:
    """FLOPs of one prefill (and one decode step) of a video question, for the base or slow-fast model."""

    label: str
    frames: int
    sequence_length: int  # tokens in the LLM sequence: video tokens + text
    video_tokens_in_sequence: int
    slow_tokens: int
    query_tokens: int  # prompt tokens that query the slow tokens
    vision: int
    llm_prefill: int  # decoder over the sequence + LM head on the last token, hybrid hooks off
    hybrid_kv_projection: int = 0
    hybrid_queries: int = 0  # query projection + cross-attention + gate of the prompt's query tokens
    decode_step: int = 0  # one generated token, slow K/V cached (slow-fast) - what we run
    decode_step_reprojecting: int | None = None  # the same with slow K/V re-projected (reference behaviour)

    @property
    def hybrid(self) -> int:
        return self.hybrid_kv_projection + self.hybrid_queries

    @property
    def llm_with_hybrid(self) -> int:
        return self.llm_prefill + self.hybrid

    @property
    def prefill_total(self) -> int:
        return self.vision + self.llm_with_hybrid

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "hybrid": self.hybrid,
            "llm_with_hybrid": self.llm_with_hybrid,
            "prefill_total": self.prefill_total,
        }


@dataclass
class FlopReport:
    model: str
    architecture: str
    family: str
    text_tokens: int
    image_size: int | None
    hybrid_layers: list[int]
    slowfast_config: dict[str, Any]
    columns: list[Column] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "columns"}
        base = self.columns[0]
        data["columns"] = [column.to_dict() for column in self.columns]
        data["llm_prefill_ratio_to_base"] = [c.llm_with_hybrid / base.llm_prefill for c in self.columns]
        return data


def flops_report(
    config: Any,
    frames: list[int],
    *,
    base_frames: int | None = None,
    text_tokens: int = 100,
    slowfast: SlowFastConfig | None = None,
    image_size: int | None = None,
    qwen3_timestamp_tokens: int = QWEN3_TIMESTAMP_TOKENS,
    name: str = "",
) -> FlopReport:
    """Base model at `base_frames` (native tokens) vs slow-fast at each of `frames`, for one video + text.

    Sequence layout: the video's tokens then `text_tokens` text tokens (the question and chat template),
    all of which query the slow tokens ("text" query tokens; "all" makes every token a query).
    `base_frames` defaults to the frames whose native tokens match the first slow-fast column's fast tokens.
    """
    from ..model import SlowFastModel

    slowfast = slowfast or SlowFastConfig()
    model = SlowFastModel(build_meta_model(config), slowfast)
    base = model.base_model
    layout = dict(image_size=image_size, qwen3_timestamp_tokens=qwen3_timestamp_tokens)
    columns_tokens = [video_tokens(base, n, slowfast, **layout) for n in frames]
    if base_frames is None:
        first = columns_tokens[0]
        base_frames = first.frames * first.fast_units // first.units
    report = FlopReport(
        model=name,
        architecture=type(base).__name__,
        family=model.family.name,
        text_tokens=text_tokens,
        image_size=columns_tokens[0].layout.image_size,
        hybrid_layers=list(model.hybrid_layer_indices),
        slowfast_config=slowfast.to_dict(),
    )
    for tokens in [video_tokens(base, base_frames, None, **layout), *columns_tokens]:
        is_base = tokens.slow_tokens == 0
        length = tokens.visual_tokens + tokens.structure_tokens + text_tokens
        visual = torch.zeros(1, length, dtype=torch.bool)
        visual[0, : tokens.visual_tokens] = True  # video first, then its structure tokens and the text
        queries = prompt_query_mask(visual, slowfast.query_tokens)[0]
        plain = count_language_model(model, length)
        column = Column(
            label=f"{'base' if is_base else 'slow-fast'} @{tokens.frames}f",
            frames=tokens.frames,
            sequence_length=length,
            video_tokens_in_sequence=tokens.visual_tokens,
            slow_tokens=tokens.slow_tokens,
            query_tokens=0 if is_base else int(queries.sum()),
            vision=count_vision(base, tokens),
            llm_prefill=plain.prefill,
            decode_step=plain.decode_step,
        )
        if not is_base:
            cached = count_language_model(model, length, query_mask=queries, slow_tokens=tokens.slow_tokens)
            again = count_language_model(
                model, length, query_mask=queries, slow_tokens=tokens.slow_tokens, reproject_slow_kv=True
            )
            column.hybrid_kv_projection = cached.slow_kv_projection
            column.hybrid_queries = cached.prefill - plain.prefill
            column.decode_step, column.decode_step_reprojecting = cached.decode_step, again.decode_step
        report.columns.append(column)
    return report


def format_report(report: FlopReport) -> str:
    """A readable table: one column per setting; "(r x)" is the ratio to the base column."""
    base = report.columns[0]
    decode = base.decode_step
    # (title, value of a column, unit, the base value ratios are taken to, or None for no ratio)
    rows: list[tuple[str, Callable[[Column], int | None], float, int | None]] = [
        ("frames encoded", lambda c: c.frames, 1, None),
        ("tokens in the LLM sequence", lambda c: c.sequence_length, 1, None),
        ("  of which video tokens", lambda c: c.video_tokens_in_sequence, 1, None),
        ("slow tokens (beside the sequence)", lambda c: c.slow_tokens, 1, None),
        ("vision tower + projector [TFLOP]", lambda c: c.vision, 1e12, base.vision),
        ("LLM prefill, self-attention layers [TFLOP]", lambda c: c.llm_prefill, 1e12, None),
        ("hybrid: slow K/V projection [TFLOP]", lambda c: c.hybrid_kv_projection, 1e12, None),
        ("hybrid: queries, cross-attn, gate [TFLOP]", lambda c: c.hybrid_queries, 1e12, None),
        ("LLM prefill incl. hybrid [TFLOP]", lambda c: c.llm_with_hybrid, 1e12, base.llm_with_hybrid),
        ("prefill total [TFLOP]", lambda c: c.prefill_total, 1e12, base.prefill_total),
        ("decode step, slow K/V cached [GFLOP]", lambda c: c.decode_step, 1e9, decode),
        ("decode step, slow K/V re-projected [GFLOP]", lambda c: c.decode_step_reprojecting, 1e9, decode),
    ]
    config = report.slowfast_config
    size = f", frames of {report.image_size}x{report.image_size} px" if report.image_size else ""
    lines = [
        f"{report.model or report.architecture} ({report.architecture}, family {report.family})",
        f"one video + {report.text_tokens} text tokens{size}; hybrid layers {report.hybrid_layers}",
        f"fast tokens: temporal sampling stride {config['temporal_sampling_stride']}, pooling stride "
        f"{config['temporal_pooling_stride']}, spatial stride {config['spatial_pooling_stride']}, min "
        f"{config['min_fast_frames']} fast frames; query tokens: {config['query_tokens']}",
        "FLOPs counted on the meta device (2 per multiply-add; attention counted in full, L_q x L_k).",
        "'re-projected' = the reference implementation's decode step (slow K/V projected again at every step).",
        "",
        "".ljust(46) + "".join(c.label.rjust(26) for c in report.columns),
    ]
    for title, get, unit, reference in rows:
        cells = []
        for column in report.columns:
            value = get(column)
            if value is None:
                text = "-"
            elif unit == 1:
                text = f"{value:,d}"
            else:
                text = f"{value / unit:,.3f}"
                if column is not base and reference:
                    text += f" ({value / reference:.3f}x)"
            cells.append(text.rjust(26))
        lines.append(title.ljust(46) + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def run_cli(args: Any) -> int:
    values = json.loads(Path(args.slowfast_config).read_text()) if args.slowfast_config else {}
    for name in (
        "temporal_sampling_stride",
        "temporal_pooling_stride",
        "spatial_pooling_stride",
        "min_fast_frames",
        "hybrid_layer_interval",
        "hybrid_layer_start",
        "hybrid_layers",
        "query_tokens",
    ):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    report = flops_report(
        load_config(args.model),
        args.frames,
        base_frames=args.base_frames,
        text_tokens=args.text_tokens,
        slowfast=SlowFastConfig.from_dict(values),
        image_size=args.image_size,
        name=args.model,
    )
    data = json.dumps(report.to_dict(), indent=2)
    if args.json_path == "-":
        print(data)
        return 0
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(data + "\n")
    return 0
