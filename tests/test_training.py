"""The training job: 2-process DDP on the CPU, kill -9 and resume, parameter groups, recipes, checkpointing."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from slowfast_adapter import SlowFastModel
from slowfast_adapter.demo.tiny_data import write_tiny_training_data
from slowfast_adapter.training.recipe import Recipe
from slowfast_adapter.training.train import build_model, resolve_resume
from slowfast_adapter.training.trainer import list_checkpoints, parameter_group_name, parameter_groups

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_training_data(tmp_path_factory.mktemp("tiny-data"))


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _overrides(tiny_data, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_data['base']}",
        f"data.train_file={tiny_data['train_file']}",
        f"train.output_dir={output_dir}",
        *extra,
    ]


def _train_cmd(tiny_data, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "slowfast_adapter.cli",
        "train",
        str(RECIPE),
        *_overrides(tiny_data, output_dir, *extra),
    ]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd[:4]} timed out after {timeout} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_ddp_two_processes_on_cpu(tiny_data, tmp_path):
    """torchrun, 2 ranks with different data shards: identical adapters at the end, and the loss goes down."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests/ddp_train_worker.py"), str(RECIPE)]
    cmd += _overrides(tiny_data, out, "train.max_steps=8", "train.per_device_batch_size=1", "train.save_steps=100")
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es)" in result.stdout + result.stderr
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert set(rank0) == set(rank1) and any(".projectors." in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    base = AutoModelForImageTextToText.from_pretrained(tiny_data["base"])
    reloaded = SlowFastModel.from_pretrained(base, out / "adapter", is_trainable=True)
    reloaded_state = {n: p for n, p in reloaded.named_parameters() if p.requires_grad}
    assert set(reloaded_state) == set(rank0)  # the saved adapter holds exactly what trained
    assert all(torch.equal(reloaded_state[k], rank0[k]) for k in rank0)
    assert _adapter(out / "adapter")["slow_branches.0.attn_gate"].abs().item() > 0  # it trained: the gate opened
    summary = json.loads((out / "train_summary.json").read_text())
    losses = summary["losses"]
    assert summary["num_processes"] == 2 and len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_killed_run_resumes_to_the_same_weights(tiny_data, tmp_path):
    """SIGKILL after the first checkpoint, restart: the final adapter equals an uninterrupted run's, bit for bit."""
    steps = ["train.max_steps=10", "train.save_steps=2", "train.save_total_limit=2"]
    full = _run(_train_cmd(tiny_data, tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr[-4000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(tiny_data, killed_dir, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
    )
    deadline = time.monotonic() + 240
    while not list_checkpoints(killed_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "adapter").exists()
    done = json.loads((list_checkpoints(killed_dir)[-1] / "trainer_state.json").read_text())["global_step"]
    assert done < 10
    with (killed_dir / "log.jsonl").open("a") as log:  # steps the killed run logged past its checkpoint
        log.writelines(json.dumps({"step": step, "loss": -1.0}) + "\n" for step in range(done + 1, done + 4))

    resumed = _run(_train_cmd(tiny_data, killed_dir, *steps))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {killed_dir / 'checkpoints'}" in resumed.stdout + resumed.stderr
    expected, actual = _adapter(tmp_path / "full/adapter"), _adapter(killed_dir / "adapter")
    assert set(expected) == set(actual)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert any(k.startswith("projector.") for k in expected)  # the trained projector copy is in the adapter
    losses = json.loads((tmp_path / "full/train_summary.json").read_text())["losses"]
    assert json.loads((killed_dir / "train_summary.json").read_text())["losses"] == losses
    logged = [json.loads(line) for line in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 11))  # no step twice, none from the killed run's tail
    assert [r["loss"] for r in logged] == [json.loads(line)["loss"] for line in (tmp_path / "full/log.jsonl").open()]
    assert len(list_checkpoints(killed_dir)) == 2  # save_total_limit


def _recipe(tiny_data, tmp_path, *extra: str) -> Recipe:
    return Recipe.from_yaml(RECIPE, _overrides(tiny_data, tmp_path / "out", *extra))


def test_parameter_groups_partition_trainable_parameters(tiny_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    recipe = _recipe(tiny_data, tmp_path, "train.learning_rate.slowfast=2e-4", "train.weight_decay=0.1")
    model = build_model(recipe, AutoModelForImageTextToText.from_pretrained(tiny_data["base"]))
    groups = parameter_groups(model, recipe.train.learning_rate, recipe.train.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})  # each in exactly one group
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"slowfast": 2e-4, "slowfast_no_decay": 2e-4, "projector": 1e-3, "projector_no_decay": 1e-3}
    assert all(g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0) for g in groups for p in g["params"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {parameter_group_name(n) for n in names} == {"slowfast", "projector"}
    assert parameter_group_name("base_model.model.language_model.layers.0.q_proj.lora_A.default.weight") == ("lora")
    model.base_model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head.weight is neither"):
        parameter_groups(model, recipe.train.learning_rate)


def test_gradient_checkpointing_covers_every_decoder_layer_and_keeps_grads(tiny_data, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from slowfast_adapter.training.data import ConversationCollator, ConversationDataset

    processor = AutoProcessor.from_pretrained(tiny_data["base"])
    dataset = ConversationDataset(tiny_data["train_file"], processor, num_frames=8)
    batch = ConversationCollator(processor)([dataset[0], dataset[1]])
    grads = {}
    for checkpointing in (False, True):
        recipe = _recipe(tiny_data, tmp_path, f"train.gradient_checkpointing={checkpointing}")
        torch.manual_seed(0)  # the same random gate_proj init in both models
        model = build_model(recipe, AutoModelForImageTextToText.from_pretrained(tiny_data["base"]))
        model.train()
        with torch.no_grad():
            for branch in model.slow_branches.values():
                branch.attn_gate.fill_(0.5)  # open gates so the slow path reaches the loss
        layers = model.family.decoder_layers(model.base_model)
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_recipe_overrides_and_validation(tiny_data, tmp_path):
    recipe = _recipe(tiny_data, tmp_path, "train.learning_rate.projector=5e-4", "slowfast.hybrid_layers=[1]")
    assert recipe.train.learning_rate == {"slowfast": 1e-2, "projector": 5e-4, "lora": 1e-3}
    assert recipe.slowfast_config().hybrid_layers == [1]
    with pytest.raises(ValueError, match="Unknown keys in recipe section 'train'"):
        _recipe(tiny_data, tmp_path, "train.bogus=1")
    with pytest.raises(ValueError, match="exactly one of data.num_frames"):
        _recipe(tiny_data, tmp_path, "data.num_frames=8")
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if path.name != "quickstart.yaml":
            Recipe.from_yaml(path)  # every shipped training recipe is valid


def test_resume_picks_the_latest_complete_checkpoint(tiny_data, tmp_path):
    recipe = _recipe(tiny_data, tmp_path)
    root = Path(recipe.train.output_dir) / "checkpoints"
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    (root / ".tmp-checkpoint-14").mkdir()
    assert resolve_resume(recipe) == root / "checkpoint-10"
    recipe.train.resume = False
    assert resolve_resume(recipe) is None


def test_recipe_rejects_the_removed_model_train_projector_key(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="model.train_projector was removed.*slowfast section"):
        _recipe(tiny_data, tmp_path, "model.train_projector=true")
    assert _recipe(tiny_data, tmp_path).slowfast_config().train_projector  # tiny_cpu.yaml sets it under slowfast


class _Toy(torch.nn.Module):
    """A model whose loss pulls its one weight towards 1."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(loss=((self.weight - 1) ** 2).sum())


@pytest.mark.parametrize(
    ("scores", "stop_at", "patience", "evaluations", "best"),
    [
        ([0.2, 0.5, 0.4, 0.5, 0.9], None, 2, 4, 1),  # no better score twice in a row after the 2nd evaluation
        ([0.2, 1.0, 0.3], 1.0, None, 2, 1),  # the target is reached at the 2nd evaluation
        ([0.2, 0.5, 0.4, 0.3, 0.1], None, None, 5, 1),  # no stop rule: all 20 steps, the best weights kept
    ],
)
def test_trainer_stops_on_the_validation_rule_and_keeps_the_best_weights(scores, stop_at, patience, evaluations, best):
    from slowfast_adapter.training.recipe import TrainArgs
    from slowfast_adapter.training.trainer import Trainer, make_accelerator, one_group

    model = _Toy()
    args = TrainArgs(max_steps=20, warmup_steps=0, lr_scheduler="constant", mixed_precision="no")
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)}
    seen, remaining = [], iter(scores)

    def evaluate() -> float:
        seen.append(model.weight.detach().clone())
        return next(remaining)

    trainer = Trainer(
        model, args, lambda epoch, skip: itertools.repeat(batch), accelerator=make_accelerator(args, cpu=True),
        groups=one_group(model, 0.05), evaluate=evaluate, eval_every=4, stop_at=stop_at, patience=patience,
    )  # fmt: skip
    summary = trainer.fit()
    assert len(seen) == evaluations and summary["global_step"] == 4 * evaluations
    assert summary["scores"] == scores[:evaluations] and summary["best_score"] == scores[best]
    assert torch.equal(model.weight.detach(), seen[best])  # the best-on-validation weights, not the last
    assert len(summary["losses"]) == 4 * evaluations and summary["losses"][-1] < summary["losses"][0]
