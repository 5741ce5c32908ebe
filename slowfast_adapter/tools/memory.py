"""Per-GPU training memory of a recipe under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3: a computed estimate.

Nothing here is measured on a GPU. Parameter counts are exact: the recipe's base model is built from its config on
the meta device (no weights, no download, as `flops.py` does) and wrapped with the recipe's slow-fast config. Token
counts come from the family's video layout (`flops.video_tokens`). The rest are the formulas below, in bytes per
GPU for one micro-batch; the report prints GiB (2**30 bytes).

Symbols: N GPUs; P frozen base parameters; T trainable parameters (slow-fast branches + the trained projector copy),
n of them tensors; D hidden, I MLP width, kv = KV heads x head dim, V vocabulary, layers decoder layers, h hybrid
layers; L tokens in the LLM sequence (fast video tokens + text), S slow tokens; B the per-device batch size.

What the code does, which the formulas follow (transformers 5.24, accelerate 1.15, DeepSpeed as published):
- The recipe loads the base in bf16 and `wrap` creates the adapter in the base's dtype (bf16); the projector copy
  is a bf16 deepcopy. Only the adapter trains (both 7B recipes: `train_projector: true`, no LoRA).
- DDP / one process: accelerate's bf16 is autocast only, so the Trainer keeps fp32 master weights itself
  (`trainer.fp32_master_weights`: the trainable parameters become fp32 before `prepare`; the frozen base stays
  bf16): fp32 gradients and fp32 AdamW moments. Autocast runs the adapter's matmuls in bf16 on bf16 copies of its
  weights, cached for the forward and kept by autograd for the backward where the layer's input needs a gradient
  (counted as 2T, an upper bound: the copy of the LLaVA projector's linear_1, whose input is the frozen tower's
  output, is freed after the forward). DDP adds its gradient buckets, fp32 like the parameters
  (gradient_as_bucket_view is False).
- FSDP2 (fsdp.yaml): the trainable parameters are fp32 (the Trainer's upcast, which accelerate would otherwise make
  itself), sharded; FSDP gathers bf16 copies to compute (param_dtype bf16), reduces gradients in bf16, keeps fp32
  sharded gradients and AdamW moments. Units: every decoder and vision layer (the `GradientCheckpointingLayer`s, as
  fsdp.yaml's `fsdp_transformer_layer_cls_to_wrap` names them; Qwen2-VL needs Qwen2VLDecoderLayer,Qwen2VLVisionBlock
  there), the input embedding, the LM head (not resharded after forward), and the root (the rest, adapter included:
  never resharded during a step).
- DeepSpeed bf16 (ds_zero2.json, ds_zero3.json): the module runs in bf16; the ZeRO optimizer keeps fp32 master
  weights and fp32 AdamW moments, partitioned. Gradient partitions are counted in fp32 (an upper bound: where
  DeepSpeed accumulates gradients in bf16 they take 2T/N bytes less). ZeRO-2 leaves the frozen base whole on every
  GPU and allocates `reduce_bucket_size` bf16 gradient buffers, two with overlap_comm. ZeRO-3 partitions every
  parameter, allocates one such buffer, and after the first step keeps up to `stage3_max_live_parameters` gathered
  bf16 parameters (those reused soon: the LM head and the last layers).

Terms (bytes per GPU):

    frozen base            DDP, ZeRO-2: 2P              FSDP, ZeRO-3: 2P/N
    trainable weights      DDP: 4T + 2T (autocast's bf16 copies)   FSDP: 4T/N   ZeRO-2: 2T + 4T/N
                           ZeRO-3: 2T/N + 4T/N
    gradients              DDP: 4T + 4T (buckets)   FSDP: 4T/N + 2T (unsharded bf16 before reduce-scatter)
                           ZeRO-2, ZeRO-3: 4T/N
    (one process on one GPU, 'single': DDP's terms without the buckets)
    AdamW state            DDP: 8T + 4n (fp32 moments, fp32 step)   FSDP: 8T/N + 4n   ZeRO-2, ZeRO-3: 8T/N
    gathered parameters    FSDP: 2 x (root unit + LM head + 2 decoder layers)   ZeRO-3: 2 x max_live   (else 0)
    DeepSpeed buffers      ZeRO-2: 2 x 2 x reduce_bucket_size   ZeRO-3: 2 x reduce_bucket_size   (else 0)
    activations            the same for every strategy:
        B x [ 2 x layers x L x D                       checkpointed inputs of every decoder layer (bf16)
            + S x (2D + h x (4D + 2D + 4kv))           slow tokens; per hybrid layer, what autograd keeps of their
                                                       projection: the norm's fp32 input copy, kv_proj's input, K/V
            + projector                                the trained projector copy's saved inputs (see below)
            + max(12 x L x V, 2 x L x (12D + 4kv + 6I)) ]  the larger of two peaks that never coincide:
              - LM head and loss: logits over all L positions, upcast to fp32 by the loss; the backward holds the
                fp32 log-probabilities and two fp32 gradients of [L, V];
              - recompute of one decoder layer in backward: what it saves per token (the two norms' fp32 input
                copies 8D, q 2D, k and v 4kv, attention output 2D, SiLU input, SiLU output and up projection 6I)
                plus gradients of the same size in flight.
        projector: LLaVA-OneVision: frames x patches per frame x (D_vision + 2D) x 2 (linear_1 input, activation input,
        linear_2 input, before the 2x2 pooling); Qwen2-VL: S x 4 x (merge^2 x D_vision) x 2 (ln_q input, mlp.0 input,
        GELU input, mlp.2 input per merged token). 0 when the projector is frozen (the vision tower is frozen, so it
        runs without saving anything; with a frozen projector the slow tokens do not need gradients either and the
        norm's fp32 copy 4D is not kept).

Left out (so real peaks are higher): the CUDA context and NCCL buffers (often 0.5-1.5 GiB), allocator caching and
fragmentation, temporaries of single ops (the vision tower's working set, chunked by `vision_chunk_frames`; the
fused attention kernels' workspace; the cross-attention of the query tokens over S slow tokens; FSDP/ZeRO
all-gather and reduce-scatter staging; the final norm's fp32 copy of [L, D], 4LD), DataLoader pinned memory, and
padding when a batch holds samples of different lengths. ZeRO-3 parameters under `stage3_param_persistence_threshold`
stay whole on every GPU (norms and biases: `zero3_persistent` in the report, a few MiB). LoRA's saved inputs are not
modelled (the 7B recipes use none).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

GIB = 2**30
BF16 = 2  # bytes per bf16 element
FP32 = 4  # bytes per fp32 element
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
REPORTED = ("single", *STRATEGIES)
"""The report's rows: one process on one GPU (no launcher, no DDP buckets), then each multi-GPU strategy."""
STRATEGY_NAMES = {
    "single": "1 process (1 GPU)",
    "ddp": "DDP",
    "fsdp": "FSDP (full shard)",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
}
DEFAULT_TEXT_TOKENS = 512
"""Text tokens per training sample (chat template, question and answer): an assumption; LLaVA-Video-178K captions
are a few hundred tokens. Every text token queries the slow tokens (`query_tokens: text`)."""


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The ZeRO settings of recipes/accelerate/ds_zero{2,3}.json that size buffers (elements, not bytes).

    DeepSpeed's defaults where the files set nothing: reduce_bucket_size 5e8, stage3_max_live_parameters 1e9.
    (tests/test_memory.py checks these against the JSON files.)"""

    zero2_reduce_bucket_size: int = 500_000_000
    zero2_overlap_comm: bool = True
    zero2_contiguous_gradients: bool = True
    zero3_reduce_bucket_size: int = 500_000_000  # not set in ds_zero3.json: DeepSpeed's default
    zero3_max_live_parameters: int = 1_000_000_000  # not set: DeepSpeed's default
    zero3_param_persistence_threshold: int = 100_000


@dataclass
class ModelCounts:
    """What the formulas need from the wrapped model: exact parameter counts (meta device) and config sizes."""

    frozen: int  # P: parameters of the base (all frozen)
    trainable: int  # T: slow-fast branches + the projector copy (+ LoRA if configured)
    trainable_tensors: int  # n: AdamW keeps one fp32 step counter per tensor
    fsdp_root: int  # parameters outside every FSDP unit (adapter included)
    fsdp_lm_head: int
    fsdp_largest_layer: int  # the largest decoder layer unit
    zero3_persistent: int  # frozen parameters in tensors of at most the persistence threshold (left out)
    hidden: int  # D
    intermediate: int  # I
    kv_dim: int  # KV heads x head dim
    vocab: int  # V
    layers: int
    hybrid_layers: int  # h
    train_projector: bool

    @property
    def total(self) -> int:
        return self.frozen + self.trainable


@dataclass
class TokenCounts:
    """Tokens of one training sample: one video of `frames` frames plus `text` text tokens."""

    frames: int
    sequence: int  # L: fast video tokens (with newline / structure tokens) + text
    fast_video: int
    text: int
    slow: int  # S
    projector_rows: int  # rows the projector copy runs on (LLaVA: patches before pooling; Qwen2-VL: merged tokens)
    projector_width: int  # elements its backward keeps per row (see the module docstring)
    image_size: int | None = None  # frame size in px the layout assumes (None: fixed by the model)


@dataclass
class Terms:
    """Bytes per GPU of each term (see the module docstring)."""

    frozen_base: float
    trainable_weights: float
    gradients: float
    optimizer: float
    gathered: float
    buffers: float
    activations: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


@dataclass
class Activations:
    """Activation terms in bytes for one micro-batch (B samples); `total` is what `Terms.activations` holds."""

    checkpoints: float
    slow_path: float
    projector: float
    loss_peak: float
    layer_recompute: float

    @property
    def total(self) -> float:
        return self.checkpoints + self.slow_path + self.projector + max(self.loss_peak, self.layer_recompute)


@dataclass
class MemoryReport:
    """The estimate for one recipe on `gpus` GPUs: counts, tokens, activation terms and each strategy's terms
    (bytes per GPU; `to_dict` adds GiB)."""

    name: str
    model: str
    gpus: int
    batch_size: int
    counts: ModelCounts
    tokens: TokenCounts
    activations: Activations
    strategies: dict[str, Terms] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "gpus": self.gpus,
            "per_device_batch_size": self.batch_size,
            "counts": asdict(self.counts),
            "tokens": asdict(self.tokens),
            "activations_bytes": {**asdict(self.activations), "total": self.activations.total},
            "strategies": {
                name: {"bytes": {**asdict(t), "total": t.total}, "gib": {k: v / GIB for k, v in _items(t)}}
                for name, t in self.strategies.items()
            },
            "assumptions": self.assumptions,
        }


def _items(terms: Terms) -> list[tuple[str, float]]:
    return [*asdict(terms).items(), ("total", terms.total)]


# ------------------------------------------------------------------------------------------ counting
def count_model(model: nn.Module, settings: DeepSpeedSettings = DeepSpeedSettings()) -> ModelCounts:
    """Exact parameter counts of a `SlowFastModel` (typically on the meta device) and the sizes the formulas use."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ..core import surface

    base = model.base_model
    params = list(model.named_parameters())
    trainable = [p for _, p in params if p.requires_grad]
    frozen = [p for _, p in params if not p.requires_grad]
    units = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    in_units = {id(p) for m in units for p in m.parameters()}
    lm_head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    special = {id(p) for m in (lm_head, embed) for p in m.parameters()}
    layers = model.family.decoder_layers(base)
    text = model.family.text_config(base)
    attn = surface.self_attention(layers[0])
    head_dim = surface.attention_attribute(attn, "head_dim")
    kv_heads = text.num_attention_heads // surface.attention_attribute(attn, "num_key_value_groups")
    threshold = settings.zero3_param_persistence_threshold
    return ModelCounts(
        frozen=sum(p.numel() for p in frozen),
        trainable=sum(p.numel() for p in trainable),
        trainable_tensors=len(trainable),
        fsdp_root=sum(p.numel() for _, p in params if id(p) not in in_units and id(p) not in special),
        fsdp_lm_head=sum(p.numel() for p in lm_head.parameters()),
        fsdp_largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        zero3_persistent=sum(p.numel() for p in frozen if p.numel() <= threshold),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
        layers=len(layers),
        hybrid_layers=len(model.hybrid_layer_indices),
        train_projector=model.slowfast_config.train_projector,
    )


def projector_rows_and_width(model: nn.Module, frames: int, slow_tokens: int) -> tuple[int, int]:
    """(rows, elements kept per row) of the trained projector copy's backward, for one video of `frames` frames.

    LLaVA-OneVision: the projector (linear_1, activation, linear_2) runs on every patch before the 2x2 pooling:
    rows = frames x patches per frame, kept per row = D_vision (linear_1 input) + D (activation input) + D (linear_2
    input). Qwen2-VL: the merger runs per merged token: ln_q input (merge^2 patches of D_vision), mlp.0 input, GELU
    input and mlp.2 input, each merge^2 x D_vision wide."""
    family = model.family.name
    config = model.base_model.config
    vision, text = config.vision_config, model.family.text_config(model.base_model)
    if family == "llava_onevision":
        patches = (vision.image_size // vision.patch_size) ** 2
        return frames * patches, vision.hidden_size + 2 * text.hidden_size
    if family == "qwen2_vl":
        return slow_tokens, 4 * vision.spatial_merge_size**2 * vision.embed_dim
    raise ValueError(f"memory: no projector formula for the {family} family (llava_onevision and qwen2_vl only).")


def count_tokens(
    model: nn.Module, frames: int, text_tokens: int = DEFAULT_TEXT_TOKENS, image_size: int | None = None
) -> TokenCounts:
    """Token counts of one sample (one video + text) under the model's slow-fast config."""
    from .flops import video_tokens

    video = video_tokens(model.base_model, frames, model.slowfast_config, image_size=image_size)
    fast = video.visual_tokens + video.structure_tokens
    rows, width = projector_rows_and_width(model, frames, video.slow_tokens)
    return TokenCounts(
        frames, fast + text_tokens, fast, text_tokens, video.slow_tokens, rows, width, video.layout.image_size
    )


# ------------------------------------------------------------------------------------------ formulas
def activation_bytes(counts: ModelCounts, tokens: TokenCounts, batch_size: int = 1) -> Activations:
    """The activation terms of one micro-batch with gradient checkpointing, bf16 (formulas in the module docstring)."""
    c, t, b = counts, tokens, batch_size
    D, L, S = c.hidden, t.sequence, t.slow
    norm_copy = FP32 * D if c.train_projector else 0  # the slow tokens need gradients only through a trained projector
    per_hybrid = norm_copy + BF16 * D + 2 * BF16 * c.kv_dim  # + kv_proj input + K and V
    saved_per_token = 2 * FP32 * D + BF16 * (2 * D + 2 * c.kv_dim + 3 * c.intermediate)  # = 12D + 4kv + 6I
    return Activations(
        checkpoints=b * c.layers * L * D * BF16,
        slow_path=b * S * (BF16 * D + c.hybrid_layers * per_hybrid),
        projector=b * t.projector_rows * t.projector_width * BF16 if c.train_projector else 0,
        loss_peak=b * 3 * FP32 * L * c.vocab,
        layer_recompute=b * 2 * L * saved_per_token,
    )


def strategy_terms(
    strategy: str,
    counts: ModelCounts,
    gpus: int,
    activations: float,
    settings: DeepSpeedSettings = DeepSpeedSettings(),
) -> Terms:
    """Bytes per GPU of each term for one strategy: 'single' (one process, no wrapper: what a CPU run measures),
    'ddp', 'fsdp', 'zero2' or 'zero3'."""
    P, T, n, N = counts.frozen, counts.trainable, counts.trainable_tensors, gpus
    if strategy in ("single", "ddp"):  # fp32 adapter (+ autocast's bf16 copies), fp32 moments + a step per tensor
        grads = FP32 * T + (FP32 * T if strategy == "ddp" else 0)  # DDP: + its gradient buckets
        return Terms(BF16 * P, FP32 * T + BF16 * T, grads, 2 * FP32 * T + FP32 * n, 0, 0, activations)
    if strategy == "fsdp":  # fp32 sharded adapter; bf16 unsharded gradients before the reduce-scatter
        gathered = BF16 * (counts.fsdp_root + counts.fsdp_lm_head + 2 * counts.fsdp_largest_layer)
        grads = FP32 * T / N + BF16 * T
        return Terms(BF16 * P / N, FP32 * T / N, grads, 2 * FP32 * T / N + FP32 * n, gathered, 0, activations)
    if strategy == "zero2":  # whole bf16 model; fp32 master, gradient and moment partitions
        copies = 2 if settings.zero2_overlap_comm else 1
        buffers = copies * BF16 * settings.zero2_reduce_bucket_size if settings.zero2_contiguous_gradients else 0
        return Terms(BF16 * P, BF16 * T + FP32 * T / N, FP32 * T / N, 2 * FP32 * T / N, 0, buffers, activations)
    if strategy == "zero3":  # every bf16 parameter partitioned; fp32 master, gradient and moment partitions
        gathered = BF16 * min(settings.zero3_max_live_parameters, counts.total)
        buffers = BF16 * settings.zero3_reduce_bucket_size
        weights = BF16 * T / N + FP32 * T / N
        return Terms(BF16 * P / N, weights, FP32 * T / N, 2 * FP32 * T / N, gathered, buffers, activations)
    raise ValueError(f"Unknown strategy {strategy!r}; expected single, {', '.join(STRATEGIES)}.")


# ------------------------------------------------------------------------------------------ reports
def build_wrapped_meta_model(model_name: str, slowfast: Any) -> nn.Module:
    """The recipe's base (shipped config or local folder) on the meta device, wrapped with `slowfast`."""
    from ..model import SlowFastModel
    from .flops import build_meta_model, load_config

    return SlowFastModel(build_meta_model(load_config(model_name)), slowfast)


def recipe_frames(recipe: Any) -> int:
    """Frames per sample the recipe trains on: data.num_frames, or data.max_frames when sampling by fps."""
    frames = recipe.data.num_frames or recipe.data.max_frames
    if not frames:
        raise ValueError("The recipe sets neither data.num_frames nor data.max_frames: pass --frames.")
    return frames


def memory_report(
    recipe_path: str | Path,
    gpus: int,
    *,
    frames: int | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    image_size: int | None = None,
    model: nn.Module | None = None,
    settings: DeepSpeedSettings = DeepSpeedSettings(),
) -> MemoryReport:
    """Per-GPU memory of each strategy for a training recipe on `gpus` GPUs (an estimate; see the module docstring).

    model: the wrapped meta model, when already built for this recipe (tests reuse one)."""
    from ..training.recipe import Recipe

    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}.")
    recipe = Recipe.from_yaml(recipe_path)
    t = recipe.train
    if recipe.model.dtype != "bfloat16" or t.mixed_precision != "bf16" or not t.gradient_checkpointing:
        raise ValueError(
            "The estimate assumes what the 7B recipes set: model.dtype bfloat16, train.mixed_precision bf16 and "
            "train.gradient_checkpointing true."
        )
    model = model or build_wrapped_meta_model(recipe.model.name_or_path, recipe.slowfast_config())
    counts = count_model(model, settings)
    frames = frames or recipe_frames(recipe)
    tokens = count_tokens(model, frames, text_tokens, image_size)
    activations = activation_bytes(counts, tokens, t.per_device_batch_size)
    report = MemoryReport(
        name=Path(recipe_path).stem,
        model=recipe.model.name_or_path,
        gpus=gpus,
        batch_size=t.per_device_batch_size,
        counts=counts,
        tokens=tokens,
        activations=activations,
        assumptions=[
            "computed, not measured on a GPU; an estimate that leaves out the CUDA context, allocator fragmentation "
            "and temporary buffers (see slowfast_adapter/tools/memory.py)",
            f"one video of {frames} frames + {text_tokens} text tokens per sample, batch {t.per_device_batch_size}",
            "bf16 base; the adapter trains with fp32 master weights, gradients and AdamW moments under every "
            "strategy (DDP: the Trainer's fp32 parameters under bf16 autocast; FSDP: fp32 shards; DeepSpeed: its "
            "fp32 optimizer partitions)",
            "gradient checkpointing of every decoder layer; fused SDPA (no L x L matrix); logits over the whole "
            "sequence upcast to fp32 by the loss",
        ],
    )
    for strategy in REPORTED:
        report.strategies[strategy] = strategy_terms(strategy, counts, gpus, activations.total, settings)
    return report


def format_markdown(report: MemoryReport) -> str:
    """One Markdown table (GiB per GPU) with the counts it rests on."""
    c, t, a = report.counts, report.tokens, report.activations
    size = f" of {t.image_size}x{t.image_size} px" if t.image_size else ""
    columns = [
        ("frozen base", "frozen_base"),
        ("adapter weights", "trainable_weights"),
        ("gradients", "gradients"),
        ("AdamW state", "optimizer"),
        ("gathered params", "gathered"),
        ("DeepSpeed buffers", "buffers"),
        ("activations", "activations"),
        ("**total**", "total"),
    ]
    lines = [
        f"### {report.name} (`{report.model}`), {report.gpus} GPUs",
        "",
        f"Computed, not measured (estimate; GiB per GPU). Frozen base {c.frozen / 1e9:.3f} B parameters, trainable "
        f"{c.trainable / 1e6:.2f} M ({c.hybrid_layers} hybrid layers"
        f"{' + projector copy' if c.train_projector else ''}). One sample: {t.frames} frames{size} -> "
        f"{t.fast_video:,d} fast tokens + {t.text} text = L {t.sequence:,d}; S {t.slow:,d} slow tokens; "
        f"batch {report.batch_size}.",
        "",
        "| strategy | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, terms in report.strategies.items():
        values = dict(_items(terms))
        cells = [f"{values[key] / GIB:.2f}" for _, key in columns[:-1]] + [f"**{terms.total / GIB:.1f}**"]
        lines.append(f"| {STRATEGY_NAMES[name]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Activations {a.total / GIB:.2f} GiB = layer checkpoints {a.checkpoints / GIB:.2f} + slow path "
        f"{a.slow_path / GIB:.2f} + projector {a.projector / GIB:.2f} + max(loss peak {a.loss_peak / GIB:.2f}, "
        f"layer recompute {a.layer_recompute / GIB:.2f}).",
    ]
    return "\n".join(lines)


MARKDOWN_HEADER = """# Training memory per GPU (computed, not measured)

Command: `{command}` ({versions}; parameter counts exact on the meta device, no GPU involved).

An estimate from the formulas in `slowfast_adapter/tools/memory.py` (its docstring states every assumption),
bytes per GPU with P frozen and T trainable parameters on N GPUs:
frozen base 2P (1 process, DDP, ZeRO-2) or 2P/N (FSDP, ZeRO-3); adapter weights, gradients and AdamW state in fp32:
whole in one process (4T + 2T autocast bf16 copies, 4T, 8T) and under DDP (+ 4T gradient buckets), sharded under FSDP
and DeepSpeed (4T/N + 4T/N + 8T/N, plus bf16 copies); gathered parameters (FSDP: root unit + LM head + 2 decoder
layers; ZeRO-3: stage3_max_live_parameters) and DeepSpeed's gradient buckets (ZeRO-2: 2 x reduce_bucket_size,
ZeRO-3: 1 x, bf16);
activations with gradient checkpointing = 2 x layers x L x D + S x (2D + h x (6D + 4kv)) + projector
+ max(12 x L x V, 2 x L x (12D + 4kv + 6I)).
Left out: the CUDA context and NCCL buffers, allocator fragmentation, temporaries of single ops.

"""


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slowfast_adapter.tools.memory",
        description="Per-GPU training memory of a recipe under DDP, FSDP, ZeRO-2 and ZeRO-3 (computed, an estimate).",
    )
    parser.add_argument("--recipe", action="append", required=True, help="a training recipe YAML (repeatable)")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs N (default 8)")
    parser.add_argument("--frames", type=int, default=None, help="frames per sample (default: the recipe's)")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens per sample")
    parser.add_argument("--image-size", type=int, default=None, help="frame size in px (Qwen-VL; default 448)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the reports as JSON here")
    parser.add_argument("--markdown", dest="markdown_path", default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    reports = [
        memory_report(path, args.gpus, frames=args.frames, text_tokens=args.text_tokens, image_size=args.image_size)
        for path in args.recipe
    ]
    command = "python -m slowfast_adapter.tools.memory " + " ".join(f"--recipe {p}" for p in args.recipe)
    command += f" --gpus {args.gpus}"
    text = "\n\n".join(format_markdown(r) for r in reports)
    print(text)
    if args.markdown_path:
        Path(args.markdown_path).write_text(MARKDOWN_HEADER.format(command=command, versions=_versions()) + text + "\n")
    if args.json_path:
        data = {"command": command, "reports": [r.to_dict() for r in reports]}
        Path(args.json_path).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "Activations",
    "DeepSpeedSettings",
    "MemoryReport",
    "ModelCounts",
    "Terms",
    "TokenCounts",
    "activation_bytes",
    "count_model",
    "count_tokens",
    "format_markdown",
    "memory_report",
    "strategy_terms",
]
