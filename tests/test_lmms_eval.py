"""The lmms-eval plugin end to end, through lmms-eval's own CLI (`python -m lmms_eval --model slowfast_adapter`).

A short demo run builds the pretrained base, the adapter and the needle test split; lmms-eval then evaluates it
through its CLI, one request type per test:
- generate_until (`slowfast_needle`): every answer equals the demo's own evaluation of the same model on the same
  videos (`NeedleTask` batches and `model.generate`), in three settings: (c) the adapter, (a) `adapter=none` at the
  native frame count, (b) `slow_path=off` at the high frame count;
- multiple choice (`slowfast_needle_mc`, loglikelihood): the accuracies lmms-eval writes equal those computed by hand
  from the plugin's own losses of the four colours, which pick the right colour far more often than the reversed
  rule would; and the same task in 2 CPU processes (`accelerate launch --multi_gpu`) merges to the one-process run;
- multi-round (a local `generate_until_multi_round` task): each round's logged answer equals the plugin's answer to
  that round's question.
Every run must write its results: lmms-eval 0.7.3 exits 0 without any when scoring fails, which fails these tests.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

INSTALL = 'pip install -e ".[eval]" -e integrations/lmms_eval'
pytest.importorskip("lmms_eval", reason=f"lmms-eval is not installed: {INSTALL}")
plugin = pytest.importorskip("slowfast_lmms_eval", reason=f"the lmms-eval plugin is not installed: {INSTALL}")

from conftest import conversation, open_gates  # noqa: E402
from lmms_eval.api.instance import unwrap_generation_output  # noqa: E402
from slowfast_lmms_eval import model as plugin_model  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from slowfast_adapter import SlowFastConfig, SlowFastModel, wrap  # noqa: E402
from slowfast_adapter.demo.experiment import DemoConfig, NeedleTask, run  # noqa: E402
from slowfast_adapter.demo.needle_data import COLORS  # noqa: E402
from slowfast_adapter.inference.video import read_clip  # noqa: E402
from slowfast_adapter.tools.tiny import random_video, write_mp4  # noqa: E402

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


def read_run(output_path: Path, task: str, num_docs: int, stdout: str = "") -> tuple[dict, list[dict]]:
    """(the task's results, its logged samples sorted by doc) of an lmms-eval run; fails when the run wrote none (as
    lmms-eval 0.7.3 does, exit status 0, when a task's scoring raises) or logged another number of documents."""
    results = glob.glob(str(output_path / "*" / "*_results.json"))
    assert len(results) == 1, f"lmms-eval wrote {len(results)} results files for {task}:\n{stdout[-3000:]}"
    metrics = json.loads(Path(results[0]).read_text())["results"].get(task)
    assert metrics, f"lmms-eval's results hold nothing for {task}:\n{stdout[-3000:]}"
    (samples,) = glob.glob(str(output_path / "*" / f"*_samples_{task}.jsonl"))
    records = sorted((json.loads(line) for line in Path(samples).read_text().splitlines()), key=lambda r: r["doc_id"])
    logged = [r["doc_id"] for r in records]
    assert logged == list(range(num_docs)), f"{task}: logged documents {logged}, not {num_docs}"
    return metrics, records


def lmms_eval(
    out: Path,
    name: str,
    model_args: str,
    *,
    task: str = "slowfast_needle",
    num_docs: int = NUM_TEST,
    include: Path = plugin.TASKS_DIR,
    extra: tuple[str, ...] = (),
    launcher: tuple[str, ...] = (sys.executable, "-m", "lmms_eval"),
    env: dict | None = None,
) -> tuple[dict, list[dict], str, float]:
    """Run lmms-eval's CLI on a task over the demo's test split; returns (results, samples by doc, output, seconds)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf-home"),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}  # fmt: skip
    output_path = out / "lmms-eval" / name
    command = [*launcher, "--model", "slowfast_adapter", "--model_args", model_args, "--tasks", task,
               "--include_path", str(include), "--batch_size", str(NUM_TEST), "--output_path", str(output_path),
               "--log_samples", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=out / "data", env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    results, records = read_run(output_path, task, num_docs, output)
    return results, records, output, seconds


@pytest.mark.slow
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
        results, records, stdout, seconds = lmms_eval(out, setting[1], model_args)
        answers = [r["filtered_resps"] for r in records]
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


def task_utils(folder: Path = plugin.TASKS_DIR / "needle"):
    """A local task folder's own functions (by default the plugin's `tasks/needle/utils.py`)."""
    spec = importlib.util.spec_from_file_location(f"task_utils_{folder.name}", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_needle_choices_are_the_demo_colours():
    assert task_utils().needle_doc_to_choice({}) == list(COLORS)


MC_TASK = "slowfast_needle_mc"
ROUNDS_DIR = Path(__file__).parent / "lmms_eval_tasks" / "rounds"


def adapter_args(out: Path, config: DemoConfig) -> str:
    return f"pretrained={out / 'pretrained-base'},adapter={out / 'adapter'},num_frames={config.high_frames}"


@pytest.fixture(scope="module")
def mc_run(demo):
    """The multiple-choice needle task through the CLI, one process: the adapter at the high frame count."""
    config, out, _ = demo
    results, records, _, seconds = lmms_eval(out, "mc-1", adapter_args(out, config), task=MC_TASK)
    return results, records, seconds


@pytest.fixture(scope="module")
def plugin_lmm(demo):
    """The plugin in this process on the same model and frames as `mc_run`; the needle test split as task data."""
    config, out, _ = demo
    lmm = plugin_model.SlowFastLMM(pretrained=str(out / "pretrained-base"), adapter=str(out / "adapter"),
                                   num_frames=config.high_frames, device="cpu")  # fmt: skip
    docs = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    lmm.task_dict = {"needle": {"test": docs}}
    return lmm, docs


def doc_visual(out: Path):
    """What the tasks' doc_to_visual gives lmms-eval, run from the demo's data folder."""
    return lambda doc: [str((out / "data" / doc["video"]).resolve())]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multiple_choice_through_the_cli_scores_the_plugins_own_losses(demo, mc_run, plugin_lmm, capsys):
    """lmms-eval's acc, acc_norm and exact_match on `slowfast_needle_mc` equal the ones computed by hand from the
    plugin's own (loss, is_greedy) of the four colours, and the right colour is the likeliest."""
    _, out, _ = demo
    results, records, seconds = mc_run
    lmm, docs = plugin_lmm
    utils = task_utils()
    choices = utils.needle_doc_to_choice(docs[0])
    requests = [Request(utils.needle_doc_to_text(doc), choice, doc_visual(out), i, "needle", "test")
                for i, doc in enumerate(docs) for choice in choices]  # fmt: skip
    pairs = lmm.continuation_losses(requests)
    losses = np.array([loss for loss, _ in pairs]).reshape(len(docs), len(choices))
    greedy = np.array([flag for _, flag in pairs]).reshape(len(docs), len(choices))
    gold = np.array([choices.index(utils.needle_doc_to_target(doc)) for doc in docs])
    lengths = np.array([len(choice) for choice in choices], dtype=np.float64)
    by_hand = {  # api/task.py::process_results: argmin of the losses, of the losses per character; greedy gold
        "acc": float(np.mean(losses.argmin(1) == gold)),
        "acc_norm": float(np.mean((losses / lengths).argmin(1) == gold)),
        "exact_match": float(np.mean(greedy[np.arange(len(docs)), gold])),
    }
    for metric, value in by_hand.items():
        assert results[f"{metric},none"] == pytest.approx(value, abs=1e-12), (metric, results)
    # lmms-eval scored the losses the plugin computes here (its sample log writes them as strings)
    logged = np.array([[float(loss) for loss, _ in r["filtered_resps"]] for r in records])
    np.testing.assert_allclose(logged, losses, rtol=1e-4, atol=1e-5)
    assert [[str(flag) == "True" for _, flag in r["filtered_resps"]] for r in records] == greedy.tolist()
    # Lower is likelier, as lmms-eval's argmin expects: the right colour wins. The plugin used to return the
    # log-probability, which made lmms-eval pick the least likely colour (argmax of the loss here).
    least_likely = float(np.mean(losses.argmax(1) == gold))
    assert by_hand["acc"] >= 0.5 > least_likely, (by_hand, least_likely)
    with capsys.disabled():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in by_hand.items())
        print(
            f"\nlmms-eval {MC_TASK} ({NUM_TEST} videos, 4 colours, {seconds:.1f} s): {scores}; "
            f"least likely colour {least_likely:.3f}"
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_cpu_processes_merge_to_the_one_process_run(demo, mc_run, capsys):
    """`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true runs two ranks, each on a share
    of the documents; the merged results equal the one-process run's, document for document."""
    config, out, _ = demo
    one_results, one_records, one_seconds = mc_run
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launcher = (accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval")  # fmt: skip
    env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    results, records, output, seconds = lmms_eval(out, "mc-2", adapter_args(out, config), task=MC_TASK,
                                                  launcher=launcher, env=env)  # fmt: skip
    assert "Running on rank 1 (local rank 1)" in output  # two processes ran, not one
    for metric in ("acc", "acc_norm", "exact_match"):
        assert results[f"{metric},none"] == pytest.approx(one_results[f"{metric},none"], abs=1e-12), metric
    two = np.array([[float(loss) for loss, _ in r["filtered_resps"]] for r in records])
    one = np.array([[float(loss) for loss, _ in r["filtered_resps"]] for r in one_records])
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    with capsys.disabled():
        print(f"\nlmms-eval {MC_TASK}: 1 process {one_seconds:.1f} s, 2 CPU processes {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multi_round_through_the_cli_answers_each_rounds_question(demo, plugin_lmm, capsys):
    """A `generate_until_multi_round` task: each round's logged answer equals the plugin's answer to that round's
    question about the same video, and lmms-eval's accuracy equals the one computed from those answers."""
    config, out, _ = demo
    lmm, docs = plugin_lmm
    limit = 4
    task, extra = "slowfast_needle_rounds", ("--limit", str(limit))
    results, records, _, seconds = lmms_eval(out, "rounds", adapter_args(out, config), task=task, num_docs=limit,
                                             include=ROUNDS_DIR, extra=extra)  # fmt: skip
    utils = task_utils(ROUNDS_DIR)
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "num_beams": 1, "until": ["<|im_end|>"]}
    expected = [
        lmm.generate_until([Request(q, dict(gen), doc_visual(out), i, "needle", "test") for i in range(limit)])
        for q in utils.QUESTIONS
    ]
    expected = [list(rounds) for rounds in zip(*expected, strict=True)]  # [doc][round]
    logged = [r["filtered_resps"] for r in records]
    logged = [rounds[0] if rounds and isinstance(rounds[0], list) else rounds for rounds in logged]
    assert logged == expected
    accuracy = np.mean([utils.rounds_process_results(doc, [rounds])["accuracy"]
                        for doc, rounds in zip(docs[:limit], expected, strict=True)])  # fmt: skip
    assert results["accuracy,none"] == pytest.approx(float(accuracy), abs=1e-12)
    with capsys.disabled():
        print(f"\nlmms-eval {task} ({limit} videos x 2 rounds, {seconds:.1f} s): accuracy {accuracy:.3f}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_that_writes_no_results_fails(tiny_dirs, tmp_path):
    """The check every CLI test uses fails on a run that exits 0 without results: lmms-eval 0.7.3 on a
    multiple-choice task when loglikelihood returns bare (loss, is_greedy) tuples, as the plugin did (its
    `unwrap_generation_output` turns them into strings and the task's scoring fails). The plugin as shipped runs
    the same task in `test_multiple_choice_through_the_cli_scores_the_plugins_own_losses`."""
    from slowfast_adapter.demo.needle_data import write_split

    write_split(tmp_path / "data", "test", 2, num_frames=4)
    base = tiny_dirs("llava_onevision")
    bare = ("import sys, slowfast_lmms_eval.model as m; m._MANGLES_TUPLES = False; "
            "from lmms_eval.__main__ import cli_evaluate; cli_evaluate()")  # fmt: skip
    args = f"pretrained={base},num_frames=4"
    if not plugin_model._MANGLES_TUPLES:  # an lmms-eval that passes tuples through: bare tuples work
        lmms_eval(tmp_path, "bare", args, task=MC_TASK, num_docs=2, launcher=(sys.executable, "-c", bare))
        return
    with pytest.raises(AssertionError, match="wrote 0 results files"):
        lmms_eval(tmp_path, "bare", args, task=MC_TASK, num_docs=2, launcher=(sys.executable, "-c", bare))
    with pytest.raises(AssertionError, match="wrote 0 results files"):
        read_run(tmp_path / "nothing", MC_TASK, 2)


def test_the_plugin_imports_no_training_code():
    """The plugin reads video through `slowfast_adapter.inference`: nothing of `slowfast_adapter.training` loads."""
    probe = "import sys, slowfast_lmms_eval.model\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    imported = set(done.stdout.split())
    assert {"slowfast_lmms_eval.model", "slowfast_adapter.inference.video"} <= imported
    assert not {m for m in imported if m.startswith("slowfast_adapter.training")}


class Request:  # what the plugin reads from lmms-eval's `Instance`
    def __init__(self, *args):
        self.args = args


def test_plugin_in_process_every_family(tiny_dir, tmp_path, monkeypatch):
    """Each family, fps sampling: batched answers equal one by one and the stock processor + `generate` (beam search
    too); a video asked twice is decoded and encoded once, and the engine keeps it for later requests; still frames
    run as one video; loglikelihood equals the stock forward's log-probabilities."""
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
    encodes, tower = [], []  # what the engine encoded (one `EncodedVideos` per prompt's videos); vision tower calls
    encode = lmm.engine.model.encode
    monkeypatch.setattr(lmm.engine.model, "encode", lambda **kw: encodes.append(encode(**kw)) or encodes[-1])
    inner = lmm.model.base_model.model
    vision = getattr(inner, "vision_tower", None) or inner.visual
    vision.register_forward_hook(lambda *_: tower.append(1))
    batched = lmm.generate_until(requests)
    assert len(reads) == 3  # video 0 asked twice, decoded once
    assert len(encodes) == len(tower) == 3  # ... and encoded once: 3 videos through the tower, and
    assert lmm.engine.cache.stats == {"hits": 1, "misses": 3, "evictions": 0}  # video 0's repeat is a hit
    assert [e.stats["misses"] for e in encodes] == [1, 1, 1]  # (the batch's generate ran no tower: it used them)
    lmm.batch_size = 1
    assert lmm.generate_until(requests) == batched
    assert len(reads) == len(encodes) == len(tower) == 3  # the engine kept all three videos between calls
    # One question per batch, sorted by video: each continued its video's cached prompt prefix (video 0's two).
    assert [e.stats["prefix_hits"] for e in encodes] == [2, 1, 1]
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

    beams = {**gen, "num_beams": 2}  # the engine's beam search (one request at a time)
    (beamed,) = lmm.generate_until([Request(docs[0]["question"], beams, lambda doc: [doc["video"]], 0, "t", "test")])
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=2)
    text = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert beamed == text.split("\n\n")[0].strip()

    continuation = " red"
    requests = [Request(docs[0]["question"], continuation, lambda doc: [doc["video"]], i, "t", "test") for i in (0, 2)]
    encoded, uses, read = len(encodes), encodes[0].stats["hits"], len(reads)
    (loss, greedy), _ = lmm.continuation_losses(requests)
    # what lmms-eval's evaluator makes of loglikelihood's results (api/instance.py) is exactly these pairs
    assert [unwrap_generation_output(r)[0] for r in lmm.loglikelihood(requests)] == [(loss, greedy), _]
    full = processor(text=[prompt + continuation], return_tensors="pt", **video)
    count = full["input_ids"].shape[1] - inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = torch.log_softmax(model(**full).logits[0, -count - 1 : -1].float(), dim=-1)
    target = full["input_ids"][0, -count:]
    assert loss == pytest.approx(-float(logits.gather(-1, target[:, None]).mean()), abs=1e-5)  # mean NLL
    # both calls' forwards reused video 0's encoding from generate_until: not read or encoded again
    assert (len(encodes), len(reads), encodes[0].stats["hits"]) == (encoded, read, uses + 4)
    assert greedy == bool((logits.argmax(-1) == target).all())
