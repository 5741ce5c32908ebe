"""The lmms-eval plugin end to end, through lmms-eval's own CLI (`python -m lmms_eval --model slowfast_adapter`).

A short demo run builds the pretrained base, the adapter and the needle test split; lmms-eval then evaluates the
plugin's task on that split in three settings, and every answer must equal the demo's own evaluation of the same
model on the same videos (`NeedleTask` batches and `model.generate`, exactly as `experiment.accuracy` does):
(c) the adapter, (a) `adapter=none` at the native frame count, (b) `slow_path=off` at the high frame count.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

INSTALL = 'pip install -e ".[eval]" -e integrations/lmms_eval'
pytest.importorskip("lmms_eval", reason=f"lmms-eval is not installed: {INSTALL}")
plugin = pytest.importorskip("slowfast_lmms_eval", reason=f"the lmms-eval plugin is not installed: {INSTALL}")

from conftest import conversation, open_gates  # noqa: E402
from slowfast_lmms_eval import model as plugin_model  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from slowfast_adapter import SlowFastConfig, SlowFastModel, wrap  # noqa: E402
from slowfast_adapter.demo.experiment import DemoConfig, NeedleTask, run  # noqa: E402
from slowfast_adapter.tiny import random_video, write_mp4  # noqa: E402
from slowfast_adapter.inference.video import read_clip  # noqa: E402

NUM_TEST = 24  # one batch, in lmms-eval as in the demo's own evaluation (batches of 50)
CONFIG = dict(
    num_pretrain=160, num_train=64, num_val=16, num_test=NUM_TEST, hidden_size=64, intermediate_size=256,
    batch_size=8, pretrain_steps=80, adapter_steps=30, adapter_lr=1e-2, eval_every=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A short `slowfast-adapter demo` run: pretrained base, trained adapter, needle test split, its results."""
    config = DemoConfig(output_dir=str(tmp_path_factory.mktemp("needle-demo")), **CONFIG)
    summary = run(config, log=lambda *_: None)
    return config, Path(config.output_dir), {row["setting"][:3]: row["accuracy"] for row in summary["results"]}


@pytest.fixture(scope="module")
def demo_answers(demo):
    """The demo's answers per setting, computed as `experiment.accuracy` does (same batches, greedy, 3 tokens)."""
    config, out, _ = demo
    processor = AutoProcessor.from_pretrained(out / "pretrained-base")
    model = SlowFastModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "pretrained-base"),
                                          out / "adapter").eval()  # fmt: skip

    def answers(frames: int, context=None) -> list[str]:
        task = NeedleTask(out / "data", "test", frames, processor)
        inputs = task.prompt_batch(list(range(len(task))))
        with context() if context else torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [text.strip() for text in texts], task.answers

    return {
        "(a)": answers(config.native_frames, model.disable_adapter),
        "(b)": answers(config.high_frames, model.slow_path_disabled),
        "(c)": answers(config.high_frames),
    }


def lmms_eval(out: Path, name: str, model_args: str) -> tuple[dict, list[str], str, float]:
    """Run lmms-eval's CLI on the plugin's needle task; returns (results, answers by doc, stdout, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf-home"),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, "-m", "lmms_eval", "--model", "slowfast_adapter", "--model_args", model_args,
               "--tasks", "slowfast_needle", "--include_path", str(plugin.TASKS_DIR), "--batch_size", str(NUM_TEST),
               "--output_path", str(out / "lmms-eval" / name), "--log_samples"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=out / "data", env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = glob.glob(str(out / "lmms-eval" / name / "*" / "*_results.json"))
    (samples,) = glob.glob(str(out / "lmms-eval" / name / "*" / "*_samples_slowfast_needle.jsonl"))
    records = sorted((json.loads(line) for line in Path(samples).read_text().splitlines()), key=lambda r: r["doc_id"])
    return (
        json.loads(Path(results).read_text())["results"]["slowfast_needle"],
        [r["filtered_resps"] for r in records],
        done.stdout,
        seconds,
    )


@pytest.mark.timeout(600)
def test_lmms_eval_cli_reproduces_the_demo_answer_for_answer(demo, demo_answers, capsys):
    config, out, demo_accuracy = demo
    base, adapter = out / "pretrained-base", out / "adapter"
    settings = {
        "(c)": f"pretrained={base},adapter={adapter},num_frames={config.high_frames}",
        "(a)": f"pretrained={base},adapter=none,num_frames={config.native_frames}",
        "(b)": f"pretrained={base},adapter={adapter},slow_path=off,num_frames={config.high_frames}",
    }
    report = []
    for setting, model_args in settings.items():
        results, answers, stdout, seconds = lmms_eval(out, setting[1], model_args)
        expected, targets = demo_answers[setting]
        assert len(answers) == NUM_TEST
        assert answers == expected, setting  # answer for answer
        accuracy = sum(a.startswith(t) for a, t in zip(expected, targets, strict=True)) / NUM_TEST
        assert results["accuracy,none"] == pytest.approx(accuracy, abs=1e-12) == demo_accuracy[setting]
        table = [line for line in stdout.splitlines() if re.match(r"^\|", line)]
        report.append((setting, model_args.replace(str(out), "<demo>"), results["accuracy,none"], seconds, table))
    assert demo_answers["(c)"][0] != demo_answers["(b)"][0]  # the adapter's slow path changes answers
    with capsys.disabled():
        print(f"\nlmms-eval on the needle test split ({NUM_TEST} videos); load average {os.getloadavg()}")
        for setting, model_args, accuracy, seconds, table in report:
            print(f"{setting} {model_args}: accuracy {accuracy:.4f} ({seconds:.1f} s)")
            print("\n".join(table))


class Request:  # what the plugin reads from lmms-eval's `Instance`
    def __init__(self, *args):
        self.args = args


def test_plugin_in_process_every_family(tiny_dir, tmp_path, monkeypatch):
    """Each family, fps sampling: batched answers equal one by one and the stock processor + `generate`; a video
    asked twice is decoded once per batch; still frames run as one video; loglikelihood equals the stock forward's
    log-probabilities."""
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model = wrap(base, SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2))
    open_gates(model)  # the slow path changes the answers
    model.save_pretrained(tmp_path / "adapter")
    videos = [write_mp4(tmp_path / f"v{i}.mp4", random_video(8, seed=i), fps=8) for i in range(3)]
    docs = [{"video": str(videos[v]), "question": q} for v, q in ((0, "What is it?"), (1, "Colour?"), (0, "Why?"),
                                                                  (2, "Where?"))]  # fmt: skip
    lmm = plugin_model.SlowFastLMM(pretrained=str(tiny_dir), adapter=str(tmp_path / "adapter"), fps=8, max_frames=8,
                                   batch_size=4, device="cpu")  # fmt: skip
    lmm.task_dict = {"t": {"test": docs}}
    reads = []
    monkeypatch.setattr(plugin_model, "read_clip", lambda path, **kw: reads.append(path) or read_clip(path, **kw))
    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    requests = [
        Request(d["question"], dict(gen), lambda doc: [doc["video"]], i, "t", "test") for i, d in enumerate(docs)
    ]
    encodes = []
    monkeypatch.setattr(lmm, "_encode", lambda inputs, **kw: encodes.append(plugin_model.SlowFastLMM._encode(
        lmm, inputs, **kw)) or encodes[-1])  # fmt: skip
    batched = lmm.generate_until(requests)
    assert len(reads) == 3  # video 0 asked twice, decoded once
    (encoded,) = encodes  # ... and encoded once: 3 videos through the tower (video 0's repeat is a hit), and
    assert encoded.stats == {
        "hits": 1 + 4,
        "misses": 3,
        "prefix_hits": 0,
    }  # generate took all 4 rows' videos from the cache
    lmm.batch_size = 1
    assert lmm.generate_until(requests) == batched
    # One question per batch, sorted by video: video 0's second question continued the first one's prompt prefix.
    assert [e.stats["prefix_hits"] for e in encodes[1:]] == [2, 1, 1]
    frames = [Image.fromarray(frame) for frame in random_video(8, seed=5)]  # MVBench-style frame folder
    (answer,) = lmm.generate_until([Request("What is it?", dict(gen), lambda doc: frames, 0, "t", "test")])
    assert isinstance(answer, str)

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):  # a second round, then the end
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["video"]], "And then?", False, previous_output, {"round": round_idx}

    visual = lambda doc: [doc["video"]]  # noqa: E731
    (rounds,) = lmm.generate_until_multi_round([Request(docs[0]["question"], dict(gen), visual, doc_to_text, 0, "t",
                                                        "test")])  # fmt: skip
    assert len(rounds) == 2 and rounds[0] == batched[0]

    args = {"pretrained": str(tiny_dir), "fps": 8, "max_frames": 8, "device": "cpu", "temporal_pooling_stride": 2}
    strided = plugin_model.SlowFastLMM(adapter=str(tmp_path / "adapter"), **args)  # pooling set at evaluation
    assert strided.model.slowfast_config == SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2,
                                                           temporal_pooling_stride=2)  # fmt: skip
    fast = plugin_model.SlowFastLMM(adapter="none", slow_path="off", min_fast_frames=2, **args)  # fresh fast tokens
    assert fast.model.slowfast_config == SlowFastConfig(min_fast_frames=2, temporal_pooling_stride=2)
    fast.task_dict = lmm.task_dict
    assert len(fast.generate_until(requests[:1])) == 1
    with pytest.raises(ValueError, match="need an adapter or slow_path=off"):
        plugin_model.SlowFastLMM(adapter="none", **args)

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = SlowFastModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), tmp_path / "adapter")
    clip = read_clip(docs[0]["video"], fps=8, max_frames=8, multiple=lmm.sampling["multiple"])
    prompt = processor.apply_chat_template(conversation("video", docs[0]["question"]), add_generation_prompt=True)
    video = {"videos": [clip.frames], "video_metadata": [clip.metadata()], "do_sample_frames": False}
    inputs = processor(text=[prompt], return_tensors="pt", **video)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert batched[0] == processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    continuation = " red"
    (logprob, greedy), _ = lmm.loglikelihood([Request(docs[0]["question"], continuation, lambda doc: [doc["video"]],
                                                      i, "t", "test") for i in (0, 2)])  # fmt: skip
    full = processor(text=[prompt + continuation], return_tensors="pt", **video)
    count = full["input_ids"].shape[1] - inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = torch.log_softmax(model(**full).logits[0, -count - 1 : -1].float(), dim=-1)
    target = full["input_ids"][0, -count:]
    assert logprob == pytest.approx(float(logits.gather(-1, target[:, None]).sum()), abs=1e-4)
    assert encodes[-1].stats == {
        "hits": 2,
        "misses": 1,
        "prefix_hits": 0,
    }  # both continuations' forwards reused one encoding
    assert greedy == bool((logits.argmax(-1) == target).all())
