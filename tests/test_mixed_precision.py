"""A bf16 base trained under bf16 mixed precision (on the CPU): the Trainer keeps fp32 master weights.

The frozen base stays bf16; the adapter's parameters, gradients, AdamW moments, checkpoints and saved adapter are
fp32; autocast computes in bf16. An update below bf16's resolution is kept (a bf16 adapter lost it); a resumed run
ends bit for bit where an uninterrupted one does; the saved adapter loads onto a fresh bf16 base (in bf16; in fp32
with `is_trainable=True`) and generates without autocast, as does the trained fp32 adapter in memory.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slowfast_adapter import SlowFastModel
from slowfast_adapter.config import SlowFastConfig
from slowfast_adapter.tools.tiny import build_tiny_llava_onevision, random_video
from slowfast_adapter.training.accelerator import make_accelerator
from slowfast_adapter.training.recipe import TrainArgs
from slowfast_adapter.training.trainer import TRAINABLE, Trainer, list_checkpoints

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test makes a bf16 Accelerator

CONFIG = SlowFastConfig(train_projector=True, hybrid_layer_interval=2, min_fast_frames=2)
PROMPT = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]}]


def _bf16_model(seed: int = 0) -> tuple[SlowFastModel, object]:
    """The tiny LLaVA-OneVision in bf16, wrapped (adapter created in bf16, as `wrap` does on a bf16 base), gates
    open so that every adapter parameter gets a gradient."""
    base, processor = build_tiny_llava_onevision()
    torch.manual_seed(seed)
    model = SlowFastModel(base.to(torch.bfloat16), CONFIG)
    with torch.no_grad():
        for branch in model.slow_branches.values():
            branch.attn_gate.fill_(0.5)
    return model, processor


def _batch(processor) -> dict[str, torch.Tensor]:
    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    batch = dict(processor(text=prompt + "red", videos=[random_video(8)], return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    return batch


def _trainer(model, batch, *, lr: float = 1e-3, steps: int = 2, output_dir: Path | None = None, **kwargs) -> Trainer:
    args = TrainArgs(
        max_steps=steps,
        warmup_steps=0,
        lr_scheduler="constant",
        mixed_precision="bf16",
        max_grad_norm=kwargs.pop("max_grad_norm", 1.0),
        learning_rate={"slowfast": lr, "projector": lr, "lora": lr},
        save_steps=kwargs.pop("save_steps", 500),
        save_total_limit=None,
    )
    accelerator = make_accelerator(args, cpu=True)
    assert accelerator.mixed_precision == "bf16"
    return Trainer(model, args, lambda epoch, skip: itertools.repeat(batch), accelerator=accelerator,
                   output_dir=output_dir, log=lambda message: None, **kwargs)  # fmt: skip


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_state(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    return [dict(trainer.optimizer.state[p]) for p in trainer.params]


def test_bf16_base_trains_fp32_master_weights_under_bf16_autocast(tmp_path):
    model, processor = _bf16_model()
    trainable_names = set(_trainable(model))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # wrap: the adapter in the base's dtype
    trainer = _trainer(model, _batch(processor), output_dir=tmp_path, save_steps=1)
    assert set(trainer.upcast) == trainable_names
    summary = trainer.fit()
    trained = summary["model"]
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in trained.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base: untouched
    assert len(trainer.optimizer.state) == len(trainable_names)
    for state in _optimizer_state(trainer):
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32

    checkpoint = list_checkpoints(tmp_path)[-1]
    assert {t.dtype for t in load_file(str(checkpoint / TRAINABLE)).values()} == {torch.float32}
    saved_optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    assert {t.dtype for s in saved_optimizer.values() for t in s.values()} == {torch.float32}
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # saved as trained, like PEFT's adapters
    assert all(torch.equal(adapter[k], v) for k, v in trained.adapter_state_dict().items())


def test_an_update_below_bf16_resolution_is_kept():
    """One AdamW step moves each weight by about lr: 1e-5 is below half a bf16 step for any weight above 2^-8 in
    magnitude (the gates at 0.5, most projection weights). A bf16 adapter (before fp32 master weights) left those
    weights unchanged; the fp32 master weights move, all of them, by lr."""
    lr, eps = 1e-5, TrainArgs().adam_epsilon
    model, processor = _bf16_model()
    before = _trainable(model)
    trainer = _trainer(model, _batch(processor), lr=lr, steps=1, max_grad_norm=None)
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: grads.update({names[id(p)]: p.grad.clone() for p in trainer.params})
    )
    trainer.fit()
    after = _trainable(model)
    lost_in_bf16 = 0
    for name, old in before.items():
        new, grad = after[name], grads[name]
        assert torch.all(new != old), name  # every element moved (a bf16 weight kept the gates at exactly 0.5)
        assert new.dtype == grad.dtype == torch.float32, name
        step = lr * grad.abs() / (grad.abs() + eps)  # AdamW's first step (bias-corrected m / sqrt(v)): about lr
        torch.testing.assert_close((new - old.float()).abs(), step, rtol=0.01, atol=0, msg=name)
        lost_in_bf16 += int((new.to(torch.bfloat16) == old).sum())
    gates = [n for n in before if n.endswith("attn_gate")]
    assert gates and all(torch.equal(after[n].to(torch.bfloat16), before[n]) for n in gates)  # bf16 rounds it away
    assert lost_in_bf16 > 0.5 * sum(t.numel() for t in before.values())


def test_resume_restores_fp32_weights_and_optimizer_state_exactly(tmp_path):
    _, processor = _bf16_model()
    batch = _batch(processor)
    full_model, _ = _bf16_model()
    full = _trainer(full_model, batch, steps=4, output_dir=tmp_path / "full", save_steps=2)
    full.fit()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-2"

    resumed_model, _ = _bf16_model()
    resumed = _trainer(resumed_model, batch, steps=4, output_dir=tmp_path / "resumed", save_steps=2)
    resumed.resume(checkpoint)
    saved = load_file(str(checkpoint / TRAINABLE))
    assert all(p.dtype == torch.float32 and torch.equal(p.detach(), saved[n]) for n, p in
               resumed_model.named_parameters() if p.requires_grad)  # fmt: skip
    resumed.fit()
    assert resumed.state["global_step"] == 4
    expected, actual = _trainable(full_model), _trainable(resumed_model)
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    for a, b in zip(_optimizer_state(full), _optimizer_state(resumed), strict=True):
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        assert a["exp_avg"].dtype == torch.float32


def test_saved_fp32_adapter_loads_onto_a_fresh_bf16_base_and_generates(tmp_path):
    model, processor = _bf16_model()
    trained = _trainer(model, _batch(processor), output_dir=tmp_path).fit()["model"].eval()
    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[random_video(8, seed=1)], return_tensors="pt")
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)

    base, _ = build_tiny_llava_onevision()
    loaded = SlowFastModel.from_pretrained(base.to(torch.bfloat16), tmp_path / "adapter").eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}  # loaded in the base's dtype, for inference
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(v, saved[k].to(torch.bfloat16)) for k, v in loaded.adapter_state_dict().items())

    # Without autocast: the bf16 adapter, and the trained fp32 adapter on its bf16 base (inputs cast to the
    # adapter's dtype, outputs back to the base's), give the same answer.
    assert not torch.is_autocast_enabled("cpu")
    answers = [m.generate(**inputs, max_new_tokens=4, do_sample=False) for m in (loaded, trained)]
    assert answers[0].shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(answers[0], answers[1])
    with torch.no_grad():
        logits = [m(**inputs).logits.float() for m in (loaded, trained)]
    assert logits[1].dtype == torch.float32 and torch.isfinite(logits[1]).all()
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0.1 * logits[0].abs().max().item())

    # To train on: the saved fp32 weights stay fp32, exactly (not their bf16 rounding); the base stays bf16.
    base, _ = build_tiny_llava_onevision()
    again = SlowFastModel.from_pretrained(base.to(torch.bfloat16), tmp_path / "adapter", is_trainable=True)
    assert {p.dtype for p in again.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in again.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert all(torch.equal(v, saved[k]) for k, v in again.adapter_state_dict().items())
    assert torch.equal(again.generate(**inputs, max_new_tokens=4, do_sample=False), answers[1])


def test_without_mixed_precision_the_parameters_keep_their_dtype():
    """`mixed_precision: no` on a bf16 base trains in pure bf16, as asked: nothing is upcast."""
    model, processor = _bf16_model()
    args = TrainArgs(max_steps=1, warmup_steps=0, mixed_precision="no")
    trainer = Trainer(model, args, lambda e, s: itertools.repeat(_batch(processor)),
                      accelerator=make_accelerator(args, cpu=True), log=lambda message: None)  # fmt: skip
    assert trainer.upcast == [] and {p.dtype for p in model.parameters()} == {torch.bfloat16}
