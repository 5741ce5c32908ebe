"""`slowfast-adapter serve` through its front door: the official `openai` client (and raw HTTP) against a live server
on localhost, answers compared token for token with freshly loaded models' `generate`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serving import FRAMES, QUESTIONS, LiveServer, Reference, build_served, messages, wait_healthy  # noqa: E402

from slowfast_adapter.inference.engine import Engine, EngineSettings  # noqa: E402
from slowfast_adapter.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return build_served(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def references(served):
    return {name: Reference(served, name) for name in served.adapters}


@pytest.fixture(scope="module")
def server(served):
    """A live server for both adapters, limits small enough to test; `jobs` records every job it runs."""
    settings = EngineSettings(num_frames=FRAMES, max_batch_size=8)
    engine = Engine.load(served.base, served.adapters, settings=settings, media_roots=[served.videos],
                         max_bytes=200_000, max_frames=64)  # fmt: skip
    jobs = []

    def submit(job):
        jobs.append(job)
        return engine.submit(job)

    live = LiveServer(create_app(engine, submit=submit))
    live.engine, live.jobs = engine, jobs
    live.client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield live
    live.stop()
    engine.close()


def ask(server, video: str, question: str, model: str = "alpha", **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return server.client.chat.completions.create(model=model, messages=messages(video, question), temperature=0,
                                                 **kwargs)  # fmt: skip


def streamed(server, video: str, question: str, model: str = "alpha", **kwargs) -> tuple[str, list]:
    kwargs.setdefault("max_tokens", 8)
    chunks = list(server.client.chat.completions.create(model=model, messages=messages(video, question),
                                                        temperature=0, stream=True, **kwargs))  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["alpha", "beta"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_answers_equal_generate_token_for_token(server, references, served):
    reference = references["alpha"]
    for video in served.names[:2]:
        for question in QUESTIONS[:2]:
            tokens, prompt_length = reference.tokens(video, question)
            answer = ask(server, video, question)
            assert answer.choices[0].message.content == reference.processor.decode(tokens, skip_special_tokens=True)
            assert answer.usage.completion_tokens == len(tokens)
            assert answer.usage.prompt_tokens == prompt_length  # the fitted prompt: fast tokens, not native ones
            assert answer.choices[0].finish_reason == ("stop" if len(tokens) < 8 else "length")


def test_two_adapters_answer_as_their_own_models(server, references, served):
    answers = {name: [ask(server, v, q, model=name).choices[0].message.content for v in served.names[:2]
                      for q in QUESTIONS[:2]] for name in ("alpha", "beta")}  # fmt: skip
    for name, texts in answers.items():
        assert texts == [references[name].text(v, q) for v in served.names[:2] for q in QUESTIONS[:2]]
    assert answers["alpha"] != answers["beta"]  # the request's model really picks the adapter


def test_streaming_equals_non_streaming(server, served):
    for video, question in [(served.names[0], QUESTIONS[0]), (served.names[1], QUESTIONS[2])]:
        whole = ask(server, video, question, max_tokens=12)
        text, chunks = streamed(server, video, question, max_tokens=12)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert all(c.id == chunks[0].id for c in chunks)


def test_stop_strings_cut_the_answer_streamed_or_not(server, references, served):
    full = references["alpha"].text(served.names[3], QUESTIONS[1], max_new_tokens=12)
    stop = full[3:5]
    assert len(stop) == 2 and full.find(stop) == 3, "pick a stop string that occurs in the answer"
    whole = ask(server, served.names[3], QUESTIONS[1], max_tokens=12, stop=[stop, "never-there"])
    assert whole.choices[0].message.content == full[: full.find(stop)]
    assert whole.choices[0].finish_reason == "stop"
    text, _ = streamed(server, served.names[3], QUESTIONS[1], max_tokens=12, stop=[stop, "never-there"])
    assert text == whole.choices[0].message.content


def test_seeded_sampling_repeats(server, served):
    def draw(seed):
        return server.client.chat.completions.create(model="alpha", messages=messages(served.names[0], "Why?"),
                                                     temperature=1.5, seed=seed, max_tokens=10)  # fmt: skip

    assert draw(7).choices[0].message.content == draw(7).choices[0].message.content
    assert len({draw(s).choices[0].message.content for s in (1, 2, 3)}) > 1  # really sampled


def test_sixteen_concurrent_requests_equal_their_sequential_answers(server, references, served):
    cases = [(v, q) for v in served.names for q in QUESTIONS]  # 4 videos x 4 questions
    sequential = {case: references["alpha"].text(*case) for case in cases}
    batches_before = metric(server, "slowfast_batches_total")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda case: ask(server, *case).choices[0].message.content, cases))
    assert dict(zip(cases, answers, strict=True)) == sequential
    assert metric(server, "slowfast_batches_total") - batches_before < 16  # some really shared a batch


def test_second_question_hits_the_encode_cache(server, served):
    video = served.names[2]
    hits, misses = (
        metric(server, "slowfast_encode_cache_hits_total"),
        metric(server, "slowfast_encode_cache_misses_total"),
    )
    ask(server, video, "A first question about a new prompt?", model="beta")
    ask(server, video, "A second one?", model="beta")
    assert metric(server, "slowfast_encode_cache_misses_total") == misses + 1  # beta had not seen clip2
    assert metric(server, "slowfast_encode_cache_hits_total") == hits + 1
    assert metric(server, "slowfast_encode_cache_bytes") > 0


def data_url(path, mime="video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_data_url_video_answers_like_the_file(server, served):
    file_answer = ask(server, served.names[1], QUESTIONS[0]).choices[0].message.content
    inline = server.client.chat.completions.create(
        model="alpha", messages=messages(data_url(served.videos / served.names[1]), QUESTIONS[0]), temperature=0,
        max_tokens=8)  # fmt: skip
    assert inline.choices[0].message.content == file_answer


def bad_requests(served, tmp_path) -> dict[str, tuple[dict, int, str]]:
    """name -> (request body, expected status, a word the error message must hold)."""
    not_video = served.videos / "notes.mp4"
    not_video.write_text("these are notes, not a video")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes((served.videos / served.names[0]).read_bytes())
    good = {"model": "alpha", "messages": messages(served.names[0], "Hi?"), "max_tokens": 4}
    big = bytes(300_000)

    def body(**changes):
        return {**good, **changes}

    return {
        "not a video": (body(messages=messages("notes.mp4", "Hi?")), 400, "as a video"),
        "http url": (body(messages=messages("https://example.com/v.mp4", "Hi?")), 400, "--allow-remote-media"),
        "outside the media root": (body(messages=messages(str(outside), "Hi?")), 404, "media folders"),
        "escaping with ..": (body(messages=messages("../outside.mp4", "Hi?")), 404, "media folders"),
        "too many frames": (body(mm_processor_kwargs={"num_frames": 128}), 400, "num_frames"),
        "frames off the strides": (body(mm_processor_kwargs={"num_frames": 10}), 400, "strides"),
        "too many bytes": (
            body(messages=messages("data:video/mp4;base64," + base64.b64encode(big).decode(), "Hi?")),
            413,
            "limit",
        ),  # fmt: skip
        "image as video": (body(messages=messages("data:image/png;base64,AAAA", "Hi?")), 400, "video/*"),
        "unknown model": (body(model="gamma"), 404, "gamma"),
        "over the context": (body(max_tokens=5000), 400, "context"),
        "n > 1": (body(n=2), 400, "n must be 1"),
        "no messages": (body(messages=[]), 400, "messages"),
        "wrong type": (body(max_tokens="many"), 400, "max_tokens"),
        "assistant last": (body(messages=[{"role": "assistant", "content": "Hello"}]), 400, "assistant"),
    }


def test_every_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, served, tmp_path):
    private = [str(served.videos), str(served.base), str(tmp_path)]
    for name, (body, status, word) in bad_requests(served, tmp_path).items():
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert word in error["message"], (name, error)
        assert error["type"] in ("invalid_request_error", "not_found_error") and error["code"], (name, error)
        sent = json.dumps(body)  # what the client sent may be echoed back; no other server path may be
        assert not any(path in response.text and path not in sent for path in private), (name, response.text)
    malformed = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "alpha",',
                           headers={"content-type": "application/json"})  # fmt: skip
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):  # the client raises its own typed errors on them
        ask(server, served.names[0], "Hi?", model="gamma")
    assert ask(server, served.names[0], QUESTIONS[0]).choices[0].message.content  # still serving


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, served):
    long = {"model": "alpha", "messages": messages(served.names[0], QUESTIONS[3]), "max_tokens": 3000,
            "temperature": 0, "stream": True}  # fmt: skip
    # The tiny model's greedy answer to this question does not end within 200 tokens (checked, so the test can fail).
    assert ask(server, served.names[0], QUESTIONS[3], max_tokens=200).choices[0].finish_reason == "length"
    count = len(server.jobs)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(6)][0].startswith("data: ")
    job = server.jobs[count]
    assert job.done.wait(30), "the abandoned request kept running"
    assert job.result.finish_reason == "cancelled" and job.result.completion_tokens < 3000
    assert ask(server, served.names[1], QUESTIONS[0]).choices[0].message.content  # the slot is free again


def test_the_cli_refuses_bad_arguments_before_loading_anything(served, tmp_path, capsys):
    from slowfast_adapter.cli import main

    base = ["serve", "--base", str(served.base)]
    alpha = str(served.adapters["alpha"])
    cases = {
        "not an adapter folder": ["--adapter", str(tmp_path / "missing")],
        "used twice": ["--adapter", f"x={alpha}", "--adapter", f"x={served.adapters['beta']}"],
        "cannot name a model": ["--adapter", f"base={alpha}"],
        "is not a folder": ["--adapter", alpha, "--media-root", str(tmp_path / "none")],
        "must be >= 1": ["--adapter", alpha, "--max-batch-size", "0"],
    }
    for message, arguments in cases.items():
        assert main([*base, *arguments]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_cli_serves(served):
    cli = [sys.executable, "-m", "slowfast_adapter.cli", "serve", "--base", str(served.base)]
    port = LiveServer.free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*cli, "--adapter", str(served.adapters["alpha"]), "--adapter",
                                f"b={served.adapters['beta']}", "--port", str(port), "--media-root",
                                str(served.videos), "--num-frames", str(FRAMES)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, 120, process.stdout.read)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["alpha", "b"]
        answer = client.chat.completions.create(model="b", messages=messages(served.names[0], QUESTIONS[0]),
                                                temperature=0, max_tokens=8)  # fmt: skip
        assert answer.choices[0].message.content == Reference(served, "beta").text(served.names[0], QUESTIONS[0])
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_prometheus_text_is_well_formed(server):
    text = httpx.get(f"{server.url}/metrics").text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all(len(line.rsplit(" ", 1)) == 2 and float(line.rsplit(" ", 1)[1]) >= 0 for line in samples)
    assert json.dumps(text)  # plain text, no binary


def test_an_image_url_answers_like_generate_on_that_image(server, references, tmp_path):
    from PIL import Image

    from slowfast_adapter.tools.tiny import random_video

    path = tmp_path / "frame.png"
    Image.fromarray(random_video(1, size=40, seed=5)[0]).save(path)
    content = [{"type": "image_url", "image_url": {"url": data_url(path, "image/png")}},
               {"type": "text", "text": "What is in the picture?"}]  # fmt: skip
    answer = server.client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": content}],
                                                   temperature=0, max_tokens=8)  # fmt: skip
    reference = references["alpha"]
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}
    ]
    prompt = reference.processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = reference.processor(text=[prompt], images=[Image.open(path).convert("RGB")], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    output = reference.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = reference.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.choices[0].message.content == expected
