"""`slowfast-adapter demo`: the needle-in-a-haystack experiment, end to end on a laptop CPU.

1. write the needle videos (mp4) and annotations for the pretrain / train / val / test splits;
2. pretrain a tiny LLaVA-OneVision on the task with its native tokens at `native_frames` frames, save it
   with `save_pretrained` (the "pretrained base" a user would download);
3. load it back, wrap it, train only the slow-fast adapter at `high_frames` frames (checkpoint chosen on
   the validation split; training stops once validation accuracy reaches `adapter_target` or stops improving);
4. on the test split, measure accuracy and LLM prefill FLOPs of (a) the base at its native frame count,
   (b) fast tokens only at the high frame count, (c) slow-fast at the high frame count, (d) the base with
   every native token of the high frame count, (e) / (f) the base with the high frame count's native tokens
   pruned training-free (EVS, VidCom2-style) to the LLM FLOPs of (c); write JSON, Markdown and a PNG plot.

`task="needle"` (the default): one coloured square in one frame, "What color is the square?". `task="order"`: two
squares in two frames that the fast tokens and the base's 8-frame subsampling both skip, "Which color came first?"
(`order_data.py`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import SlowFastConfig
from ..core import inspection, state
from ..core.frame_attention import where_it_looked
from ..core.pooling import plan_fast_frames
from ..inference.video import read_video
from ..model import wrap
from ..tools.tiny import build_tiny_llava_onevision
from ..training.accelerator import make_accelerator
from ..training.recipe import TrainArgs
from ..training.trainer import BatchSource, Trainer, one_group
from .flops import prefill_flops
from .needle_data import COLORS, read_split, write_split
from .order_data import hidden_frames, write_order_split
from .pruning import pruned_inputs
from .quickstart import answer_batch

TASKS = ("needle", "order")


@dataclass
class DemoConfig:
    """Defaults of `slowfast-adapter demo` (sized for 1 to 2 minutes on 2 quiet CPU cores).

    `output_dir` must not hold a previous run (`pretrained-base/` or `adapter/`): a new base under an old adapter
    would load without a warning and answer badly, so `run` refuses; pick a new folder or remove the old one."""

    output_dir: str = "demo-output"
    task: str = "needle"
    """'needle' (what: one square's colour) or 'order' (when: which of two squares came first)."""
    native_frames: int = 8
    high_frames: int = 32
    frame_size: int = 32
    patch_size: int = 8  # 4x4 patches per frame, pooled 2x2 by the model: 4 video tokens per frame
    needle_size: int = 16
    num_pretrain: int = 2000
    num_train: int = 800
    num_val: int = 200
    num_test: int = 400
    hidden_size: int = 128
    num_layers: int = 4
    num_kv_heads: int = 1
    intermediate_size: int = 1024
    batch_size: int = 16
    pretrain_steps: int = 2000  # at most: pretraining stops once the base masters its own validation videos
    pretrain_target: float = 0.98
    pretrain_lr: float = 1e-3
    adapter_steps: int = 500  # at most: see adapter_target and adapter_patience
    adapter_lr: float = 3e-3
    adapter_target: float | None = 1.0
    """The adapter stage stops once validation accuracy reaches this (None: never)."""
    adapter_patience: int | None = 2
    """... or once validation accuracy has not improved for this many evaluations in a row (None: never).
    Either way the adapter keeps its best-on-validation weights."""
    eval_every: int = 100  # steps between validation evaluations, in both stages
    seed: int = 0
    pruning_rules: list[str] = field(default_factory=lambda: ["evs", "vidcom2"])
    """Rows (e), (f): the base on pruned native tokens, at the largest budget within (c)'s LLM prefill FLOPs."""
    slowfast: dict[str, Any] = field(
        default_factory=lambda: {
            "temporal_sampling_stride": 4,
            "temporal_pooling_stride": 2,
            "min_fast_frames": 4,
            "hybrid_layers": [0, 1],
            "query_tokens": "text_after_first_video",
            "slow_key_positions": "temporal",  # the order task needs it (benchmarks/results/slowfast_evidence.md)
        }
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}.")

    def slowfast_config(self) -> SlowFastConfig:
        return SlowFastConfig(**self.slowfast)

    def build_base(self):
        """(a fresh, untrained tiny LLaVA-OneVision of this config's shape, its processor)."""
        return build_tiny_llava_onevision(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            image_size=self.frame_size,
            patch_size=self.patch_size,
            seed=self.seed,
        )


def _conversation(question: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return turns if answer is None else [*turns, {"role": "assistant", "content": answer}]


class NeedleTask:
    """Decoded videos of one split (kept in memory) and batches built with the stock processor."""

    def __init__(self, root: Path, split: str, num_frames: int, processor, *, part: slice = slice(None)) -> None:
        self.records = read_split(root / f"{split}.jsonl")[part]
        self.videos = [read_video(root / r["video"], num_frames) for r in self.records]
        self.answers = [r["conversations"][1]["value"] for r in self.records]
        self.processor = processor
        question = self.records[0]["conversations"][0]["value"].replace("<video>", "").strip()
        self.prompt = processor.apply_chat_template(_conversation(question), add_generation_prompt=True)

    def __len__(self) -> int:
        return len(self.records)

    def training_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Prompt + answer, labels on the answer tokens only (right padding)."""
        answers = [self.answers[i] for i in indices]
        return answer_batch(self.processor, self.prompt, answers, [self.videos[i] for i in indices])

    def random_batches(self, batch_size: int, seed: int) -> BatchSource:
        """Endless training batches of `batch_size` distinct random videos, from a numpy RNG seeded with `seed`."""

        def batches(epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
            rng = np.random.default_rng(seed)
            for draw in itertools.count():
                indices = rng.choice(len(self), size=batch_size, replace=False).tolist()
                if draw >= skip:
                    yield self.training_batch(indices)

        return batches

    def prompt_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        self.processor.tokenizer.padding_side = "left"
        videos = [self.videos[i] for i in indices]
        return self.processor(text=[self.prompt] * len(indices), videos=videos, return_tensors="pt", padding=True)


@torch.no_grad()
def accuracy(
    model, task: NeedleTask, *, batch_size: int = 50, slow_path: bool = True, pruning: tuple[str, int] | None = None
) -> float:
    """Fraction of videos whose greedy answer starts with the right colour.

    slow_path: whether the model is expected to read the slow tokens (the slow-fast setting) or not (base,
    fast tokens only); checked on every batch, so a number is never reported for a path that did not run.
    pruning: (rule, budget): the base model (adapter off) on each video's native tokens pruned to `budget`
    (`pruning.py`).
    """
    model.eval()
    count = len(task)
    correct = 0
    for start in range(0, count, batch_size):
        indices = list(range(start, min(count, start + batch_size)))
        inputs = task.prompt_batch(indices)
        with inspection.recording() as contexts:
            if pruning is None:
                output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            else:
                inputs = pruned_inputs(model, inputs, *pruning).model_inputs
                with model.disable_adapter():
                    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        check_slow_path(contexts, rows=len(indices), expected=slow_path and pruning is None)
        texts = task.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(text.strip().startswith(task.answers[i]) for text, i in zip(texts, indices, strict=True))
    return correct / count


def needle_peaks(model, task: NeedleTask, *, batch_size: int = 50) -> list[bool]:
    """For each video of `task`: does "where it looked" (the map of the token that predicts the answer's first
    token, mean over the hybrid layers) peak at the needle's frame? (The first of `frame_ranks`: ties go to the
    earlier frame, as `argmax` does.)"""
    peaks = []
    for record, video, ranked in zip(task.records, task.videos, frame_ranks(model, task, batch_size=batch_size),
                                     strict=True):  # fmt: skip
        frames_per_unit = video.shape[0] // len(ranked)
        peaks.append(ranked[0] // frames_per_unit == record["needle"]["frame"] // frames_per_unit)
    return peaks


@torch.no_grad()
def frame_ranks(model, task: NeedleTask, *, batch_size: int = 50) -> list[list[int]]:
    """For each video of `task`: the frames of "where it looked" (the map of the token that predicts the answer's
    first token, mean over the hybrid layers) from the most to the least attended, in the video's own frames."""
    model.eval()
    ranks = []
    for start in range(0, len(task), batch_size):
        indices = list(range(start, min(len(task), start + batch_size)))
        looked = where_it_looked(model, task.prompt_batch(indices))
        for row, i in enumerate(indices):
            frames_per_unit = task.videos[i].shape[0] // int(looked.num_frames[row])
            order = torch.argsort(looked.per_frame(row), descending=True, stable=True)
            ranks.append([int(unit) * frames_per_unit for unit in order])
    return ranks


def looked_rates(records: list[dict], ranks: list[list[int]]) -> dict[str, float]:
    """How often "where it looked" (`frame_ranks`) peaks where the answer is. Needle: at the needle's frame
    (`peak`), at it or a neighbour (`peak_within_1`), needle among the top 2 (`top2`). Order: the peak at one of the
    two squares' frames (`peak_at_a_square`), at the first square (`peak_at_first`), the top 2 = both squares
    (`top2_both_squares`)."""
    hits: dict[str, list[bool]] = {}

    def add(name: str, value: bool) -> None:
        hits.setdefault(name, []).append(bool(value))

    for record, rank in zip(records, ranks, strict=True):
        if "needle" in record:
            frame = record["needle"]["frame"]
            add("peak", rank[0] == frame)
            add("peak_within_1", abs(rank[0] - frame) <= 1)
            add("top2", frame in rank[:2])
        else:
            frames = [square["frame"] for square in record["squares"]]
            add("peak_at_a_square", rank[0] in frames)
            add("peak_at_first", rank[0] == frames[0])
            add("top2_both_squares", set(rank[:2]) == set(frames))
    return {name: sum(values) / len(values) for name, values in hits.items()}


def check_slow_path(contexts: list[state.SlowContext], *, rows: int, expected: bool) -> None:
    """With `expected`, one call ran and every decode step's new token of every row read the slow tokens;
    without, no slow context ran at all."""
    if not expected:
        if contexts:
            raise RuntimeError("The slow path ran in a setting that must not use it.")
        return
    if len(contexts) != 1:
        raise RuntimeError(f"Expected one slow-fast call, saw {len(contexts)}.")
    decode = [per_row for step, _, per_row in contexts[0].counters.reads if step > 1]
    if not decode or any(per_row.tolist() != [1] * rows for per_row in decode):
        raise RuntimeError("A generated token did not read the slow tokens: the measured setting is not slow-fast.")


def train(
    model,
    task: NeedleTask,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None],
    name: str,
    evaluate: Callable[[], float] | None = None,
    eval_every: int = 0,
    stop_at: float | None = None,
    patience: int | None = None,
) -> dict[str, Any]:
    """The shared `Trainer` on the CPU: AdamW on every trainable parameter, linear warmup + cosine decay,
    random batches of `task`. With `evaluate`, keeps the best-on-validation weights and stops at `stop_at`
    or after `patience` evaluations without improvement. Returns the trainer's summary."""
    args = TrainArgs(
        max_steps=steps,
        per_device_batch_size=batch_size,
        seed=seed,
        warmup_steps=max(1, steps // 20),
        mixed_precision="no",
        logging_steps=max(1, steps // 10),
    )
    trainer = Trainer(
        model,
        args,
        task.random_batches(batch_size, seed),
        accelerator=make_accelerator(args, cpu=True),
        groups=one_group(model, lr),
        evaluate=evaluate,
        eval_every=eval_every,
        stop_at=stop_at,
        patience=patience,
        name=f"  {name}",
        log=log,
    )
    return trainer.fit()


def train_adapter(config: DemoConfig, base_dir: Path, slowfast: SlowFastConfig, *, log: Callable[[str], None]):
    """Load the pretrained base, wrap it with `slowfast`, train the adapter at the high frame count.

    Returns `(model, processor, best validation accuracy)`; the weights kept are the best on validation.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data = Path(config.output_dir) / "data"
    torch.manual_seed(config.seed)
    model = wrap(AutoModelForImageTextToText.from_pretrained(base_dir), slowfast)
    processor = AutoProcessor.from_pretrained(base_dir)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"      hybrid layers {model.hybrid_layer_indices}; {trainable:,d} trainable of {total:,d} parameters")
    train_task = NeedleTask(data, "train", config.high_frames, processor)
    val_task = NeedleTask(data, "val", config.high_frames, processor)
    summary = train(
        model,
        train_task,
        steps=config.adapter_steps,
        lr=config.adapter_lr,
        batch_size=config.batch_size,
        seed=config.seed + 1,
        log=log,
        name="adapter",
        evaluate=lambda: accuracy(model, val_task),
        eval_every=config.eval_every,
        stop_at=config.adapter_target,
        patience=config.adapter_patience,
    )
    return model, processor, summary.get("best_score", float("nan"))


def write_data(config: DemoConfig) -> Path:
    """Write the needle videos and annotations of every split under `output_dir/data`; returns that folder."""
    data = Path(config.output_dir) / "data"
    size = {"size": config.frame_size, "needle_size": config.needle_size}
    if config.task == "order":  # high-frame videos: squares only in frames the fast tokens and (a) skip
        stride = plan_fast_frames(config.high_frames, config.slowfast_config()).sampling_stride
        hidden = hidden_frames(config.high_frames, fast_stride=stride, native_frames=config.native_frames)
        write_order_split(data, "pretrain", config.num_pretrain, num_frames=config.native_frames, **size)
        for split, count in (("train", config.num_train), ("val", config.num_val), ("test", config.num_test)):
            write_order_split(data, split, count, num_frames=config.high_frames, frames=hidden, **size)
        return data
    write_split(data, "pretrain", config.num_pretrain, num_frames=config.native_frames, **size)
    for split, count in (("train", config.num_train), ("val", config.num_val), ("test", config.num_test)):
        write_split(data, split, count, num_frames=config.high_frames, **size)
    return data


def pretrain_base(config: DemoConfig, *, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """Build a tiny LLaVA-OneVision and pretrain it on the `native_frames` videos (native tokens) until it masters
    its own held-out videos; save model and processor to `output_dir/pretrained-base` (the "base" a user would
    download). Returns that folder and the trainer's summary. Needs `write_data` first."""
    data = Path(config.output_dir) / "data"
    base, processor = config.build_base()
    held_out = max(1, config.num_pretrain // 10)  # the base's own validation videos
    pretrain = NeedleTask(data, "pretrain", config.native_frames, processor, part=slice(0, -held_out))
    pretrain_val = NeedleTask(data, "pretrain", config.native_frames, processor, part=slice(-held_out, None))
    summary = train(base, pretrain, steps=config.pretrain_steps, lr=config.pretrain_lr, batch_size=config.batch_size,
                    seed=config.seed, log=log, name="base",
                    evaluate=lambda: accuracy(base, pretrain_val, slow_path=False), eval_every=config.eval_every,
                    stop_at=config.pretrain_target)  # fmt: skip
    base_dir = Path(config.output_dir) / "pretrained-base"
    base.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    return base_dir, summary


PREVIOUS_RUN = ("pretrained-base", "adapter")
"""What a finished (or partly finished) demo run leaves in its output folder, which a new run never replaces."""


def check_output_dir(config: DemoConfig) -> None:
    """Refuse (FileExistsError, nothing written) an output folder that holds a previous run's base or adapter."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file; give a folder for the demo's results.")
    found = [name for name in PREVIOUS_RUN if (out / name).exists()]
    if found:
        raise FileExistsError(
            f"{out} holds a previous demo run ({', '.join(f'{name}/' for name in found)}); a new run would replace "
            f"its base under its adapter. Give another folder (output_dir=...) or remove {out} first."
        )


def run(config: DemoConfig | None = None, log: Callable[[str], None] = tqdm.write) -> dict[str, Any]:
    """The whole experiment into `config.output_dir`, which must not hold a previous run (`check_output_dir`)."""
    config = config or DemoConfig()
    check_output_dir(config)
    out = Path(config.output_dir)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()

    log(f"[1/5] writing {config.task} videos to {out / 'data'}")
    data = write_data(config)
    log(f"      {config.num_pretrain} pretrain videos of {config.native_frames} frames; train/val/test "
        f"{config.num_train}/{config.num_val}/{config.num_test} of {config.high_frames} frames "
        f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip

    log(f"[2/5] pretraining a tiny LLaVA-OneVision base on {config.native_frames}-frame videos (native tokens)")
    base_dir, _ = pretrain_base(config, log=log)
    log(f"      saved the pretrained base to {base_dir} ({time.perf_counter() - t0:.0f} s)")

    log(f"[3/5] training the slow-fast adapter at {config.high_frames} frames")
    model, processor, _ = train_adapter(config, base_dir, config.slowfast_config(), log=log)
    model.save_pretrained(out / "adapter")
    log(f"      saved the adapter to {out / 'adapter'} ({time.perf_counter() - t0:.0f} s)")

    log("[4/5] evaluating on the test split")
    rows = evaluate(config, model, processor, data, log=log)

    log("[5/5] writing the results")
    summary = {
        "config": asdict(config),
        "chance": 1 / len(COLORS),
        "results": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_results(out, summary)
    log(markdown_table(summary))
    log(f"done in {summary['seconds']} s; results in {out / 'results.json'}, results.md, results.png")
    return summary


def evaluate(config: DemoConfig, model, processor, data: Path, *, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows (a)-(d) and one pruning row per `config.pruning_rules` on the test split: accuracy, LLM prefill FLOPs
    (one prompt, counted on a real forward) and the video tokens in the LLM sequence; (c) also where it looked."""
    test_high = NeedleTask(data, "test", config.high_frames, processor)
    test_native = NeedleTask(data, "test", config.native_frames, processor)
    sample = test_high.prompt_batch([0])
    native_sample = test_native.prompt_batch([0])
    video_id = model.base_model.config.video_token_id
    rows = []

    def measure(name: str, description: str, task: NeedleTask, inputs, context=None, pruning=None) -> None:
        with context() if context else nullcontext():
            acc = accuracy(model, task, slow_path=context is None, pruning=pruning)
            flops = prefill_flops(model, inputs)
            tokens = model.prepare_inputs(**inputs).input_ids if context == model.slow_path_disabled else None
        if tokens is None:
            tokens = inputs["input_ids"]
        rows.append({"setting": name, "description": description, "frames": task.videos[0].shape[0],
                     "video_tokens": int((tokens[0] == video_id).sum()), "accuracy": acc,
                     "llm_prefill_flops": flops["total"], "flops": flops})  # fmt: skip
        log(f"      {name}: accuracy {acc:.3f}, LLM prefill {flops['total'] / 1e6:.2f} MFLOP")

    measure("(a) base, native frames", "base model, native tokens", test_native, native_sample, model.disable_adapter)
    measure("(b) fast tokens only", "slow_path_disabled()", test_high, sample, model.slow_path_disabled)
    measure("(c) slow-fast adapter", "fast tokens + slow cross-attention", test_high, sample)
    rows[-1]["video_tokens"] = rows[-2]["video_tokens"]  # the fast tokens; the slow ones are not in the sequence
    rows[-1]["looked"] = looked_rates(test_high.records, frame_ranks(model, test_high))
    if config.task == "needle":
        rows[-1]["looked_at_needle"] = rows[-1]["looked"]["peak"]
    log(f"      where it looked: {rows[-1]['looked']}")
    measure("(d) base, all native tokens", "base model, native tokens", test_high, sample, model.disable_adapter)
    flops_c = rows[2]["llm_prefill_flops"]
    for letter, rule in zip("ef", config.pruning_rules, strict=False):
        tokens = rows[1]["video_tokens"], rows[3]["video_tokens"]  # fast tokens .. every native token
        budget = pruning_budget(model, sample, rule, flops_c, tokens=tokens)
        pruned = pruned_inputs(model, sample, rule, budget).model_inputs
        name = {"evs": "EVS", "vidcom2": "VidCom2-style"}.get(rule, rule)
        measure(f"({letter}) base, {name} pruning", f"{rule} to {budget} video tokens, training-free", test_high,
                pruned, model.disable_adapter, pruning=(rule, budget))  # fmt: skip
    return rows


def pruning_budget(model, sample: dict[str, Any], rule: str, max_flops: int, *, tokens: tuple[int, int]) -> int:
    """The most video tokens (newline included, in `tokens` = (least, most)) whose LLM prefill FLOPs on `sample` (one
    prompt) stay within `max_flops` when the base runs `rule`'s pruned tokens."""
    budget, most = tokens
    with model.disable_adapter():
        while budget < most:
            flops = prefill_flops(model, pruned_inputs(model, sample, rule, budget + 1).model_inputs)["total"]
            if flops > max_flops:
                break
            budget += 1
    return budget


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| setting | frames | video tokens in the LLM | accuracy | LLM prefill MFLOP |",
        "|---|---|---|---|---|",
    ]
    for row in summary["results"]:
        lines.append(
            f"| {row['setting']} | {row['frames']} | {row.get('video_tokens', '')} | {row['accuracy']:.3f} | "
            f"{row['llm_prefill_flops'] / 1e6:.2f} |"
        )
    lines.append(f"\nChance accuracy: {summary['chance']:.2f}.")
    looked = [row["looked"] for row in summary["results"] if "looked" in row]
    if looked:
        rates = ", ".join(f"{name} {value:.1%}" for name, value in looked[0].items())
        lines.append(f"Where it looked (the slow-fast adapter's per-frame map, test videos): {rates}.")
    return "\n".join(lines)


def write_results(out: Path, summary: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(summary) + "\n")
    plot(summary, out / "results.png")


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in summary["results"]:
        ax.scatter(row["llm_prefill_flops"] / 1e6, row["accuracy"], s=60)
        ax.annotate(row["setting"], (row["llm_prefill_flops"] / 1e6, row["accuracy"]), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")  # fmt: skip
    ax.axhline(summary["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("LLM prefill compute per video (MFLOP)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.margins(x=0.3)  # room for the labels
    ax.set_title({"needle": "Video needle in a haystack", "order": "Which color came first?"}[
        summary["config"].get("task", "needle")])  # fmt: skip
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
