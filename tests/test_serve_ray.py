"""`slowfast-adapter serve --ray --replicas 2` on the CPU, through the front door: the CLI in its own process (a local
Ray cluster), the official `openai` client over HTTP.

Checked against the one-process path (an `Engine` answering one request at a time, greedy): every answer equal token
for token, while requests run batched on the replicas; streaming equals non-streaming; a repeat question about a video
reaches the replica that encoded it and hits its encode cache; both replicas serve; errors keep their status; Ctrl-C
stops the server and leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving import LiveServer, wait_healthy  # noqa: E402

import slowfast_adapter as sfa  # noqa: E402
from slowfast_adapter.inference.chat import SamplingParams  # noqa: E402
from slowfast_adapter.inference.engine import Engine, EngineSettings  # noqa: E402
from slowfast_adapter.tools.tiny import random_video, write_mp4  # noqa: E402

SLOW = pytest.mark.slow  # a Ray cluster and two model replicas: ~50-90 s on 2 busy cores
FRAMES, TOKENS, VIDEOS = 8, 6, 6
BATCHED, ROUTED = range(0, 3), range(3, 6)  # videos of the batching test, videos first seen by the routing test
QUESTIONS = ["What happens?", "Which colours do you see?"]
STARTUP_S = 240
COUNTERS = ("slowfast_requests_completed_total", "slowfast_completion_tokens_total")


def chat(video: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    """(base folder, adapter folder, video folder, openai client, base URL) of a running `serve --ray` process;
    stopped with Ctrl-C at the end, which must end every process it started."""
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("ray")
    base_dir = tiny_dirs("llava_onevision")
    model = sfa.wrap(
        AutoModelForImageTextToText.from_pretrained(base_dir).eval(),
        sfa.SlowFastConfig(min_fast_frames=2, temporal_sampling_stride=2, temporal_pooling_stride=2),
    )
    with torch.no_grad():  # open the gates: the slow tokens move the answer
        for branch in model.slow_branches.values():
            branch.attn_gate.fill_(1.5)
    model.save_pretrained(root / "adapter")
    videos = root / "videos"
    videos.mkdir()
    for i in range(VIDEOS):
        write_mp4(videos / f"v{i}.mp4", random_video(16, size=32, seed=i))
    port = LiveServer.free_port()
    command = serve_command(base_dir, root / "adapter", videos, port, "--replicas", "2", "--replica-cpus", "1",
                            "--batch-wait-ms", "500")  # fmt: skip
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, env={**cli_env(), "RAY_DEDUP_LOGS": "0"}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, STARTUP_S, lambda: (root / "server.log").read_text()[-3000:])
        # /health answers once one replica runs; the CLI says "serving" once every replica runs and the router
        # knows them all (a video asked about before then stays with the replicas it knew)
        wait_for_line(root / "server.log", "serving ['a']", process, STARTUP_S)
        assert "videos asked about now may all go to those" not in (root / "server.log").read_text()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield base_dir, root / "adapter", videos, client, url
    finally:
        stopped = _stop(process)
        log.close()
    assert stopped == 0, (root / "server.log").read_text()[-3000:]
    assert _session_members(process.pid) == [], "serve --ray left processes behind"


def serve_command(base_dir: Path, adapter: Path, videos: Path, port: int, *ray_options: str) -> list[str]:
    """`slowfast-adapter serve --ray` on the tiny base and adapter `a`, reading `videos`, with `ray_options`."""
    return [sys.executable, "-m", "slowfast_adapter.cli", "serve", "--base", str(base_dir), "--adapter",
            f"a={adapter}", "--media-root", str(videos), "--num-frames", str(FRAMES), "--port", str(port), "--ray",
            *ray_options]  # fmt: skip


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout importable."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    """Wait until `text` appears in the file `log`; fail with its tail if `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> int | None:
    """Ctrl-C the server; if it does not end in time, kill its process group (`_session_members` kills the rest)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
    return process.returncode


def _session_members(session: int) -> list[str]:
    """Live processes of the server's session (Ray's daemons and workers), after a grace period for them to exit;
    any left are killed (by id) before the test fails."""
    for _ in range(30):
        out = subprocess.run(["ps", "-eo", "sid=,stat=,pid=,comm="], capture_output=True, text=True).stdout
        rows = [line.split() for line in out.splitlines()]
        alive = [row for row in rows if row[0] == str(session) and not row[1].startswith("Z")]
        if not alive:
            return []
        time.sleep(1)
    for row in alive:
        os.kill(int(row[2]), signal.SIGKILL)
    return [" ".join(row) for row in alive]


@pytest.fixture(scope="module")
def expected(served):
    """The one-process answers: an `Engine` answering each (video, question) alone, greedy."""
    base_dir, adapter, videos, _, _ = served
    engine = Engine.load(base_dir, {"a": adapter}, media_roots=[videos],
                         settings=EngineSettings(num_frames=FRAMES, max_batch_size=1))  # fmt: skip
    try:
        return {
            (i, q): engine.chat(chat(f"v{i}.mp4", q), sampling=SamplingParams(max_tokens=TOKENS)).text
            for i in range(VIDEOS)
            for q in QUESTIONS
        }
    finally:
        engine.close()


def ask(client, video: int, question: str, **kwargs):
    """(answer text, response headers) of a non-streaming request."""
    raw = client.chat.completions.with_raw_response.create(
        model="a", messages=chat(f"v{video}.mp4", question), max_tokens=TOKENS, temperature=0, **kwargs
    )
    return raw.parse().choices[0].message.content, raw.headers


@SLOW
def test_batched_answers_equal_one_by_one(served, expected):
    """All questions at once: each video's questions meet on one replica (the videos spread over both), run batched
    there (500 ms wait), and every answer equals the one-process one."""
    client = served[3]
    keys = [(i, q) for i in BATCHED for q in QUESTIONS]
    with ThreadPoolExecutor(len(keys)) as pool:
        replies = list(pool.map(lambda key: ask(client, *key), keys))
    for key, (text, _) in zip(keys, replies, strict=True):
        assert text == expected[key], key
    assert max(int(headers["x-slowfast-batch"]) for _, headers in replies) > 1, "no request ran batched"
    replicas = {i: set() for i in BATCHED}
    for (i, _), (_, headers) in zip(keys, replies, strict=True):
        replicas[i].add(headers["x-slowfast-replica"])
    assert all(len(where) == 1 for where in replicas.values()), f"a video's questions went to two replicas: {replicas}"
    assert len(set.union(*replicas.values())) == 2, "one replica served every video"
    assert len(set(expected.values())) > 1  # the answers depend on the video and the question


@SLOW
def test_repeats_reach_the_replica_that_encoded_the_video(served, expected):
    """Sequential questions about new videos: the repeats go to the video's replica and hit its encode cache."""
    client = served[3]
    first = {}
    for rounds in range(2):
        for i in ROUTED:
            text, headers = ask(client, i, QUESTIONS[rounds % 2])
            assert text == expected[(i, QUESTIONS[rounds % 2])]
            replica = headers["x-slowfast-replica"]
            if rounds:
                assert replica == first[i], f"video {i} moved from replica {first[i]} to {replica}"
                assert headers["x-slowfast-cache"] == "hit"
            first.setdefault(i, replica)
    assert len(set(first.values())) == 2, "one replica served every video"


@SLOW
def test_streaming_equals_non_streaming(served, expected):
    client = served[3]
    stream = client.chat.completions.create(model="a", messages=chat("v1.mp4", QUESTIONS[0]), max_tokens=TOKENS,
                                            temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[(1, QUESTIONS[0])]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_merged_metrics_label_every_sample_with_its_replica():
    from slowfast_adapter.serve.ray_app import merge_metrics

    def text(count: int, ok: int) -> str:
        return (f"# HELP a_total A.\n# TYPE a_total counter\na_total {count}\n# HELP b_total B.\n"
                f'# TYPE b_total counter\nb_total{{code="200"}} {ok}\nb_total{{code="400"}} 1\n')  # fmt: skip

    assert merge_metrics({"r2": text(4, 5), 'r"1': text(3, 2)}) == (
        '# HELP a_total A.\n# TYPE a_total counter\na_total{replica="r\\"1"} 3\na_total{replica="r2"} 4\n'
        '# HELP b_total B.\n# TYPE b_total counter\nb_total{replica="r\\"1",code="200"} 2\n'
        'b_total{replica="r\\"1",code="400"} 1\nb_total{replica="r2",code="200"} 5\n'
        'b_total{replica="r2",code="400"} 1\n'
    )


def by_replica(url: str, name: str = "slowfast_requests_completed_total") -> dict[str, float]:
    """A counter of each replica, from the router's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    assert text.count(f"# TYPE {name} ") == 1, text
    prefix = f'{name}{{replica="'
    samples = [line[len(prefix) :].split('"} ') for line in text.splitlines() if line.startswith(prefix)]
    return {replica: float(value) for replica, value in samples}


@SLOW
def test_metrics_gather_every_replica(served, expected):
    """The router's /metrics holds every replica's counters, each labelled with its replica: the requests each one
    answered (as the replies' headers say) are exactly what its counter grew by."""
    client, url = served[3], served[4]
    before = by_replica(url)
    answered: dict[str, int] = {}
    for i in range(VIDEOS):
        _, headers = ask(client, i, QUESTIONS[0])
        answered[headers["x-slowfast-replica"]] = answered.get(headers["x-slowfast-replica"], 0) + 1
    after = by_replica(url)
    assert len(after) == 2 and set(answered) == set(after), (answered, after)
    assert {replica: after[replica] - before.get(replica, 0) for replica in after} == answered


@SLOW
def test_a_client_that_disconnects_mid_stream_ends_its_job_on_the_replica(served):
    """Closing a streamed request cancels the replica's job through the router: it ends (counted as completed) long
    before the tokens it asked for, and the server answers the next request."""
    client, url = served[3], served[4]
    # The tiny model's greedy answer to this question does not end within 100 tokens (checked, so the test can fail).
    assert client.chat.completions.create(model="a", messages=chat("v0.mp4", QUESTIONS[1]), max_tokens=100,
                                          temperature=0).choices[0].finish_reason == "length"  # fmt: skip
    completed, tokens = (sum(by_replica(url, name).values()) for name in COUNTERS)
    body = {"model": "a", "messages": chat("v0.mp4", QUESTIONS[1]), "max_tokens": 2000, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        assert [next(lines) for _ in range(6)][0].startswith("data: ")
    deadline = time.monotonic() + 60
    while sum(by_replica(url).values()) == completed and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(by_replica(url).values()) == completed + 1, "the abandoned request did not end"
    assert sum(by_replica(url, COUNTERS[1]).values()) - tokens < 1000, "the abandoned request ran to its length"
    assert ask(client, 1, QUESTIONS[0])[0]


@SLOW
def test_errors_keep_their_status(served):
    client, url = served[3], served[4]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=chat("v0.mp4", "Hi"), max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="no such file"):
        client.chat.completions.create(model="a", messages=chat("missing.mp4", "Hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="num_frames"):
        client.chat.completions.create(model="a", messages=chat("v0.mp4", "Hi"), max_tokens=2,
                                       extra_body={"mm_processor_kwargs": {"num_frames": 1000}})  # fmt: skip
    assert [m.id for m in client.models.list()] == ["a"]
    reply = httpx.post(f"{url}/v1/chat/completions", content=b"{bad json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


@SLOW
def test_replicas_that_do_not_fit_the_local_cluster_are_refused(served):
    """More CPUs than the machine has: a clear error and status 2, not replicas waiting forever to be scheduled."""
    base_dir, adapter, videos, _, _ = served
    command = serve_command(base_dir, adapter, videos, LiveServer.free_port(), "--replicas", "1", "--replica-cpus",
                            str(os.cpu_count() + 1))  # fmt: skip
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=STARTUP_S,
                            start_new_session=True)  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"need {os.cpu_count() + 1} CPUs" in result.stderr and "Ask for fewer --replicas" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--replica-cpus", "1"], "--replica-cpus needs --ray"),
        (["--ray-address", "auto"], "--ray-address needs --ray"),
        (["--replicas", "3"], "--replicas needs --ray"),
        (["--no-video-routing"], "--no-video-routing needs --ray"),
        (["--ray", "--replicas", "0"], "--replicas must be >= 1"),
        (["--ray", "--replica-cpus", "0"], "--replica-cpus must be > 0"),
        (["--ray", "--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
    ],
)
def test_ray_arguments_are_checked_before_anything_loads(tmp_path, capsys, extra, message):
    """Bad Ray options end the CLI with status 2 and one line, before a model or Ray is loaded."""
    from slowfast_adapter.cli import main

    (tmp_path / "adapter_config.json").write_text("{}")
    assert main(["serve", "--base", str(tmp_path / "no-base"), "--adapter", f"a={tmp_path}", *extra]) == 2
    assert message in capsys.readouterr().err
