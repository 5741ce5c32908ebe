"""The per-GPU memory estimate (slowfast_adapter/tools/memory.py): exact counts, the formulas' structure, and its
parameter / gradient / optimizer / activation terms against what torch really holds for a tiny model on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from slowfast_adapter.config import SlowFastConfig
from slowfast_adapter.configs import CONFIGS_DIR
from slowfast_adapter.model import SlowFastModel
from slowfast_adapter.tools.memory import (
    BF16,
    FP32,
    STRATEGIES,
    DeepSpeedSettings,
    activation_bytes,
    build_wrapped_meta_model,
    count_model,
    count_tokens,
    format_markdown,
    memory_report,
    strategy_terms,
)
from slowfast_adapter.training.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "llava-video-7b-qwen2": ROOT / "recipes" / "llava_video_7b.yaml",
    "qwen2-vl-7b-instruct": ROOT / "recipes" / "qwen2_vl_7b.yaml",
}


@pytest.fixture(scope="module", params=list(RECIPES))
def seven_b(request):
    """(shipped config folder, recipe path, recipe, wrapped meta model) of one 7B recipe."""
    recipe = Recipe.from_yaml(RECIPES[request.param])
    model = build_wrapped_meta_model(recipe.model.name_or_path, recipe.slowfast_config())
    return request.param, RECIPES[request.param], recipe, model


# ------------------------------------------------------------------------------- counts from the config
def _qwen2_text(t: dict) -> int:
    """Embedding + decoder layers + final norm of a Qwen2 text model (no LM head)."""
    D, inter, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = t["num_key_value_heads"] * D // t["num_attention_heads"]
    attention = (D * D + D) + 2 * (D * kv + kv) + D * D  # q (bias), k and v (bias), o (no bias)
    layer = attention + 3 * D * inter + 2 * D  # gate/up/down (no bias), two RMSNorms
    return V * D + t["num_hidden_layers"] * layer + D


def _config_counts(folder: str) -> dict[str, int]:
    """Parameter counts of the base from the shipped config.json alone: 'base' (all), 'projector', and 'root_base'
    (the base parameters outside every decoder / vision layer, the embedding and the LM head: FSDP's root unit)."""
    config = json.loads((CONFIGS_DIR / folder / "config.json").read_text())
    text = config.get("text_config") or config  # Qwen2-VL keeps the text sizes at the top level
    D, V = text["hidden_size"], text["vocab_size"]
    v = config["vision_config"]
    if folder == "llava-video-7b-qwen2":
        Dv, Iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
        layer = 4 * (Dv * Dv + Dv) + (Dv * Iv + Iv) + (Iv * Dv + Dv) + 2 * 2 * Dv  # attention, MLP, 2 LayerNorms
        embeddings = 3 * p * p * Dv + Dv + (v["image_size"] // p) ** 2 * Dv  # patch conv + positions
        tower = embeddings + v["num_hidden_layers"] * layer + 2 * Dv  # + post_layernorm
        projector = Dv * D + D + D * D + D
        root = embeddings + 2 * Dv + projector + D + D  # + image_newline + final norm
        return {"base": _qwen2_text(text) + V * D + tower + projector + D, "projector": projector, "root_base": root}
    E, M, merge = v["embed_dim"], v["embed_dim"] * v["mlp_ratio"], v["spatial_merge_size"]
    block = 2 * 2 * E + (E * 3 * E + 3 * E) + (E * E + E) + (E * M + M) + (M * E + E)
    W = E * merge**2
    projector = 2 * E + (W * W + W) + (W * v["hidden_size"] + v["hidden_size"])  # ln_q, mlp.0, mlp.2
    patch_embed = v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * E  # no bias
    tower = patch_embed + v["depth"] * block + projector
    return {"base": _qwen2_text(text) + V * D + tower, "projector": projector, "root_base": patch_embed + projector + D}


def test_meta_parameter_counts_equal_the_analytic_counts_of_the_config(seven_b):
    folder, _, recipe, model = seven_b
    counts = count_model(model)
    expected = _config_counts(folder)
    projector = expected["projector"]
    assert counts.frozen == expected["base"]
    text = json.loads((CONFIGS_DIR / folder / "config.json").read_text())
    text = text.get("text_config") or text
    D, kv = text["hidden_size"], text["num_key_value_heads"] * text["hidden_size"] // text["num_attention_heads"]
    config = recipe.slowfast_config()
    hybrid = len(range(config.hybrid_layer_start, text["num_hidden_layers"], config.hybrid_layer_interval))
    per_hybrid = (D * 2 * kv + 2 * kv) + (D + 1) + 1  # kv_proj (bias), gate_proj (bias), alpha
    assert (hybrid, counts.hybrid_layers) == (4, 4)
    assert counts.trainable == hybrid * per_hybrid + projector
    assert counts.trainable_tensors == hybrid * 5 + (4 if folder.startswith("llava") else 6)
    assert (counts.hidden, counts.kv_dim, counts.vocab, counts.layers) == (D, kv, text["vocab_size"], 28)
    # FSDP units: root + LM head + the units partition the model
    assert counts.fsdp_lm_head == text["vocab_size"] * D
    assert counts.fsdp_root == expected["root_base"] + counts.trainable  # the adapter sits in the root unit
    layer = (_qwen2_text(text) - text["vocab_size"] * D - D) // text["num_hidden_layers"]
    assert counts.fsdp_largest_layer == layer


def test_frozen_base_is_sharded_exactly_over_the_gpus_and_totals_never_grow_with_more_gpus(seven_b):
    _, _, _, model = seven_b
    counts = count_model(model)
    ddp = strategy_terms("ddp", counts, 1, 0)
    assert ddp.frozen_base == BF16 * counts.frozen
    assert ddp.total - strategy_terms("single", counts, 1, 0).total == FP32 * counts.trainable  # DDP's fp32 buckets
    previous = None
    for gpus in (1, 2, 4, 8, 16):
        terms = {s: strategy_terms(s, counts, gpus, 0) for s in STRATEGIES}
        assert terms["ddp"] == ddp  # DDP replicates everything
        assert terms["zero2"].frozen_base == ddp.frozen_base
        assert terms["fsdp"].frozen_base == terms["zero3"].frozen_base == ddp.frozen_base / gpus
        if previous is not None:
            for s in STRATEGIES:
                assert terms[s].total <= previous[s].total
            for s in ("fsdp", "zero2", "zero3"):
                assert terms[s].total < previous[s].total
        previous = terms
    assert counts.zero3_persistent * BF16 < 0.01 * 2**30  # what the estimate leaves out under ZeRO-3 is small


def test_activations_grow_linearly_in_frames(seven_b):
    folder, _, _, model = seven_b
    counts = count_model(model)
    acts = [activation_bytes(counts, count_tokens(model, frames)) for frames in (64, 128, 192)]
    totals = [a.total for a in acts]
    assert totals[0] < totals[1] < totals[2]
    assert totals[2] - totals[1] == totals[1] - totals[0]  # affine: the text tokens are the constant part
    for name in ("slow_path", "projector"):  # per frame: no constant part
        assert getattr(acts[1], name) == 2 * getattr(acts[0], name) > 0
    tokens = count_tokens(model, 64)
    if folder.startswith("llava"):  # 64 frames of 14 x 14 tokens; 16 fast frames + the newline token
        assert (tokens.slow, tokens.fast_video, tokens.projector_rows) == (64 * 196, 16 * 196 + 1, 64 * 729)
    else:  # 32 groups of 2 frames at 448 px: 16 x 16 merged tokens each; 8 fast groups
        assert (tokens.slow, tokens.fast_video, tokens.projector_rows) == (32 * 256, 8 * 256, 32 * 256)


def test_deepspeed_and_fsdp_settings_match_the_launch_configs():
    accelerate = ROOT / "recipes" / "accelerate"
    zero2 = json.loads((accelerate / "ds_zero2.json").read_text())["zero_optimization"]
    zero3 = json.loads((accelerate / "ds_zero3.json").read_text())["zero_optimization"]
    s = DeepSpeedSettings()
    assert (zero2["reduce_bucket_size"], zero2["overlap_comm"], zero2["contiguous_gradients"]) == (
        s.zero2_reduce_bucket_size,
        s.zero2_overlap_comm,
        s.zero2_contiguous_gradients,
    )
    assert "reduce_bucket_size" not in zero3 and "stage3_max_live_parameters" not in zero3  # DeepSpeed's defaults
    assert zero3["stage3_param_persistence_threshold"] == s.zero3_param_persistence_threshold
    fsdp = yaml.safe_load((accelerate / "fsdp.yaml").read_text())
    assert fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_config"]["fsdp_offload_params"] is False


def test_report_says_computed_and_every_strategy_fits_the_recipes_gpus(seven_b):
    """The report is labelled as an estimate wherever it is quoted, and what the recipes promise holds under the
    estimate: every strategy fits the 80 GB GPUs they name, and sharding (FSDP, ZeRO-3) needs less than replicating.
    (The terms themselves are checked against real tensors below.)"""
    _, path, _, model = seven_b
    report = memory_report(path, 8, model=model)
    assert list(report.strategies) == ["single", *STRATEGIES]
    assert "Computed, not measured" in format_markdown(report)
    header = path.read_text().split("\nmodel:")[0]
    assert "COMPUTED, not measured" in header and "memory" in header
    totals = {strategy: terms.total for strategy, terms in report.strategies.items()}
    assert all(total < 80 * 2**30 for total in totals.values()), totals
    assert totals["fsdp"] < totals["ddp"] and totals["zero3"] < totals["zero2"], totals


# ----------------------------------------------------------------------------- real tensors on the CPU
def _tiny_bf16_llava():
    from slowfast_adapter.tools.tiny import build_tiny_llava_onevision

    base, processor = build_tiny_llava_onevision(hidden_size=128, intermediate_size=256)
    base = base.to(torch.bfloat16).train()
    torch.manual_seed(0)
    model = SlowFastModel(base, SlowFastConfig(train_projector=True, hybrid_layer_interval=2, min_fast_frames=2))
    return model, processor


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_single_process_weights_gradients_and_adamw_state_equal_a_real_training_step():
    """One optimizer step of the Trainer (what `slowfast-adapter train` runs) on the tiny bf16 base with
    mixed_precision bf16 on the CPU: the frozen base bf16 (2P), fp32 master weights (4T) plus autocast's bf16
    copies that autograd keeps for the backward (at most 2T), fp32 gradients (4T), fp32 AdamW moments and an fp32
    step per tensor (8T + 4n)."""
    import itertools

    from slowfast_adapter.tools.tiny import random_video
    from slowfast_adapter.training.accelerator import make_accelerator
    from slowfast_adapter.training.recipe import TrainArgs
    from slowfast_adapter.training.trainer import Trainer

    model, processor = _tiny_bf16_llava()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True,
    )
    batch = dict(processor(text=prompt + "red", videos=[random_video(8)], return_tensors="pt"))
    batch["labels"] = batch["input_ids"]
    with torch.no_grad():
        for branch in model.slow_branches.values():
            branch.attn_gate.fill_(0.5)  # open gates: the slow path reaches the loss
    args = TrainArgs(max_steps=1, warmup_steps=0, lr_scheduler="constant", mixed_precision="bf16")
    trainer = Trainer(model, args, lambda epoch, skip: itertools.repeat(batch),
                      accelerator=make_accelerator(args, cpu=True), log=lambda message: None)  # fmt: skip
    grads: list[torch.Tensor] = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, a, k: grads.extend(p.grad for p in trainer.params if p.grad is not None)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    copies: dict[int, int] = {}  # bf16 copies of trainable weights that autograd saved for the backward

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        whole = tensor.t() if tensor.ndim == 2 else tensor  # linear saves its weight transposed (a view)
        if tensor.dtype == torch.bfloat16 and any(
            whole.shape == p.shape and torch.equal(whole, p.detach().to(torch.bfloat16)) for p in trainable
        ):
            copies[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.fit()

    counts = count_model(model)
    terms = strategy_terms("single", counts, 1, 0)
    assert len(grads) == len(trainable) == counts.trainable_tensors  # every trainable tensor got a gradient
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert _tensor_bytes(frozen) == terms.frozen_base == BF16 * counts.frozen  # the base stays bf16
    assert _tensor_bytes(trainable) == FP32 * counts.trainable  # fp32 master weights
    assert 0 < sum(copies.values()) <= BF16 * counts.trainable  # autocast's copies: counted as 2T, an upper bound
    assert terms.trainable_weights == (FP32 + BF16) * counts.trainable
    assert _tensor_bytes(grads) == terms.gradients == FP32 * counts.trainable
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert len(trainer.optimizer.state) == counts.trainable_tensors
    assert {t.dtype for t in state} == {torch.float32}
    assert _tensor_bytes(state) == terms.optimizer  # fp32 moments + one fp32 step per tensor
    assert strategy_terms("ddp", counts, 2, 0).gradients == 2 * terms.gradients  # + DDP's fp32 buckets


class _SavedBytes:
    """Bytes autograd saves for backward inside the block, not counting parameters or the given inputs."""

    def __init__(self, module: torch.nn.Module, *inputs: torch.Tensor) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *inputs]}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> _SavedBytes:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def test_activation_formulas_match_what_autograd_saves_in_the_real_modules():
    """Per token: the decoder layer's recompute set, the slow K/V projection of a hybrid layer and the projector
    copy, each measured with saved-tensor hooks on a tiny bf16 model (frozen weights; only the small extras the
    formulas leave out, such as RoPE tables, log-sum-exp and norm statistics, differ)."""
    model, _ = _tiny_bf16_llava()
    counts = count_model(model)
    D, kv, inter = counts.hidden, counts.kv_dim, counts.intermediate
    tokens = count_tokens(model, 8, text_tokens=10)
    acts = activation_bytes(counts, tokens)
    layers = model.family.decoder_layers(model.base_model)
    length = 96

    hidden = torch.randn(1, length, D, dtype=torch.bfloat16, requires_grad=True)
    position_ids = torch.arange(length)[None]
    rope = model.base_model.model.language_model.rotary_emb(hidden, position_ids)
    with _SavedBytes(layers[1], hidden, *rope) as layer:
        layers[1](hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rope)
    per_token = acts.layer_recompute / 2 / tokens.sequence
    assert per_token == 12 * D + 4 * kv + 6 * inter
    assert per_token <= layer.total / length <= 1.05 * per_token

    slow = torch.randn(length, D, dtype=torch.bfloat16, requires_grad=True)  # needs grads: the projector trains
    branch, norm = model.slow_branches["0"], layers[0].input_layernorm
    with _SavedBytes(torch.nn.ModuleList([norm, branch]), slow) as projection:
        key_value = branch.kv_proj(norm(slow))
    saved = projection.total + _tensor_bytes([key_value])  # the K/V stay in the call's cache
    per_slow_token = (acts.slow_path / tokens.slow - BF16 * D) / counts.hybrid_layers
    assert per_slow_token == 4 * D + 2 * D + 4 * kv
    assert per_slow_token <= saved / length <= 1.02 * per_slow_token

    projector = model.slowfast_adapters["default"].projectors[0]
    vision = model.base_model.config.vision_config
    features = torch.randn(length, vision.hidden_size, dtype=torch.bfloat16)
    with _SavedBytes(projector, features) as saved_projector:
        projector(features)
    measured = saved_projector.total + _tensor_bytes([features])  # linear_1 keeps the tower's output alive
    assert measured == length * tokens.projector_width * BF16
    assert acts.projector == tokens.projector_rows * tokens.projector_width * BF16


def test_qwen2_vl_merger_formula_matches_what_autograd_saves():
    from slowfast_adapter.tools.tiny import build_tiny_qwen2_vl

    base, _ = build_tiny_qwen2_vl()
    model = SlowFastModel(base.to(torch.bfloat16), SlowFastConfig(train_projector=True, min_fast_frames=2))
    tokens = count_tokens(model, 8, text_tokens=10)
    merger = model.slowfast_adapters["default"].projectors[0]
    vision = base.config.vision_config
    rows = 32
    patches = torch.randn(rows * vision.spatial_merge_size**2, vision.embed_dim, dtype=torch.bfloat16)
    with _SavedBytes(merger, patches) as saved:
        merger(patches)
    expected = rows * tokens.projector_width * BF16
    assert expected <= saved.total + _tensor_bytes([patches]) <= 1.05 * expected  # + LayerNorm statistics
    assert tokens.projector_rows == tokens.slow
