"""The inference engine without HTTP: answers equal `generate` on every family, batches equal one by one, and its
parts (per-row stop strings and streaming, the encode cache's byte bound, the media policy) on constructed inputs."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from serving import FRAMES, QUESTIONS, Reference, build_served, messages

from slowfast_adapter.core import encoded as encoded_module
from slowfast_adapter.core.encoded import fingerprint as hash_
from slowfast_adapter.families.llava_onevision import LlavaOnevisionFamily
from slowfast_adapter.inference.answers import AnswerRow
from slowfast_adapter.inference.chat import SamplingParams
from slowfast_adapter.inference.collate import collate
from slowfast_adapter.inference.encode_cache import CachedVideos, EncodeCache
from slowfast_adapter.inference.engine import ChatJob, Engine, EngineSettings
from slowfast_adapter.inference.media import MediaPolicy, RequestError, load_media
from slowfast_adapter.inference.video import VideoClip
from slowfast_adapter.tools.tiny import random_video

FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_served(request, tmp_path_factory):
    served = build_served(tmp_path_factory.mktemp(request.param), request.param, num_videos=2)
    engine = Engine.load(served.base, {"alpha": served.adapters["alpha"]}, media_roots=[served.videos],
                         settings=EngineSettings(num_frames=FRAMES, expose_baselines=True))  # fmt: skip
    yield served, engine
    engine.close()


def test_answers_equal_generate_and_batches_equal_one_by_one(family_served):
    served, engine = family_served
    reference = Reference(served, "alpha")
    cases = [(video, question) for video in served.names for question in QUESTIONS[:2]]
    expected = [reference.tokens(*case) for case in cases]
    alone = [engine.chat(messages(*case), sampling=SamplingParams(max_tokens=8)) for case in cases]
    for answer, (tokens, prompt_length) in zip(alone, expected, strict=True):
        assert answer.text == reference.processor.decode(tokens, skip_special_tokens=True)
        assert (answer.completion_tokens, answer.prompt_tokens) == (len(tokens), prompt_length)
    jobs = [engine.prepare(ChatJob("alpha", messages(*case), SamplingParams(max_tokens=8))) for case in cases]
    batches = engine.counters["batches"]
    engine.run_batch(jobs)  # one left-padded batch of 4 (two per video), all videos already encoded
    assert engine.counters["batches"] == batches + 1
    assert [job.result.text for job in jobs] == [answer.text for answer in alone]
    assert all(job.result.cache_hit for job in jobs)


def test_the_worker_hashes_no_cached_video(family_served, monkeypatch):
    """Videos are matched to the encode cache by a digest of their pixels (~60 ms per 64-frame 384-px video). A
    request about a cached video hashes it once, while it is prepared in the caller's thread; the worker's own calls
    (the length check, `generate`) and a batch of such requests (its rows' pixels put together) hash nothing."""
    served, engine = family_served
    cases = [(video, question) for video in served.names for question in QUESTIONS[:2]]
    for video in served.names:  # encoded and cached
        engine.chat(messages(video, QUESTIONS[0]), sampling=SamplingParams(max_tokens=2))
    threads = []
    monkeypatch.setattr(encoded_module, "fingerprint", lambda p: threads.append(threading.current_thread()) or hash_(p))
    answer = engine.chat(messages(*cases[1]), sampling=SamplingParams(max_tokens=2))  # runs on the worker thread
    assert answer.cache_hit and threads == [threading.current_thread()]
    jobs = [engine.prepare(ChatJob("alpha", messages(*case), SamplingParams(max_tokens=4))) for case in cases]
    assert len(threads) == 1 + len(cases)  # each prompt's one video, hashed while prepared
    batches = engine.counters["batches"]
    engine.run_batch(jobs)
    assert engine.counters["batches"] == batches + 1 and all(job.result.cache_hit for job in jobs)
    assert len(threads) == 1 + len(cases), "the batch hashed its pixels again"
    alone = [engine.chat(messages(*case), sampling=SamplingParams(max_tokens=4)).text for case in cases]
    assert [job.result.text for job in jobs] == alone  # each row read its own video's features


def test_cached_videos_are_hashed_before_their_pixels_reach_the_models_device(family_served, monkeypatch):
    """On a GPU the engine hashes the host's pixels and gives the device copy their digest: hashing the copy would
    bring 113 MB per video back from the GPU. A meta device stands in for the GPU (a meta tensor cannot be hashed)."""
    served, engine = family_served
    if not isinstance(engine.model.family, LlavaOnevisionFamily):
        pytest.skip("Qwen-VL splits its pixels by the grids' values, which a meta tensor does not hold")
    engine.chat(messages(served.names[0], QUESTIONS[0]), sampling=SamplingParams(max_tokens=2))  # encoded, cached
    monkeypatch.setattr(engine.model, "device", torch.device("meta"), raising=False)
    job = engine.prepare(ChatJob("alpha", messages(served.names[0], QUESTIONS[1]), SamplingParams(max_tokens=2)))
    views = [pixels for pixels, _ in engine.model.family.video_pixels(job.inputs)]
    assert views and all(view.device.type == "meta" for view in views)
    host = engine.model.family.video_pixels(engine.inputs([job], on_model=False))
    memo = engine.cache.peek(job.cache_key).encoded
    assert [memo.fingerprint(view) for view in views] == [hash_(pixels) for pixels, _ in host]


def test_a_batch_is_its_rows_inputs_put_together_as_the_processor_batches_them(family_served):
    """A batch takes its rows' prepared inputs (no second processor run over every frame): equal to the processor's
    own left-padded batch, key by key; where rows cannot be put together (images tiled differently), the engine asks
    the processor, so the batch is the processor's either way."""
    served, engine = family_served
    cases = [(video, question) for video in served.names for question in QUESTIONS[:2]]  # prompts of two lengths
    jobs = [engine.prepare(ChatJob("alpha", messages(*case), SamplingParams(max_tokens=8))) for case in cases]
    collated = collate([job.inputs for job in jobs], engine.processor.tokenizer.pad_token_id)
    assert collated is not None
    assert_same_inputs(collated, engine.inputs(jobs))
    pixels = np.random.default_rng(0).integers(0, 256, (32, 96, 3), dtype=np.uint8)  # LLaVA-OV: 3 tiles, not 2
    frames = [random_video(1, size=size, seed=size)[0] for size in (40, 56)] + [pixels]
    images = [Image.fromarray(frame) for frame in frames]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    image_jobs = [engine.prepare_read(ChatJob("alpha", []), conversation, images=[image]) for image in images]
    assert_same_inputs(engine.batch_inputs(image_jobs)[0], engine.inputs(image_jobs))


def test_collate_pads_tokens_on_the_left_and_refuses_what_it_cannot_join():
    one = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
           "pixels": torch.zeros(1, 3), "sizes": [(1, 2)]}  # fmt: skip
    two = {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "pixels": torch.ones(2, 3), "sizes": [(3, 4)]}  # fmt: skip
    batch = collate([one, two], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch["pixels"].tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]] and batch["sizes"] == [(1, 2), (3, 4)]
    assert collate([one, {**two, "pixels": torch.ones(2, 4)}], pad_token_id=0) is None  # trailing shapes differ
    assert collate([one, {k: v for k, v in two.items() if k != "sizes"}], pad_token_id=0) is None  # other keys
    assert collate([one, two], pad_token_id=None) is None


def assert_same_inputs(batch: dict, expected: dict) -> None:
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else batch[key] == value, key


def test_baseline_modes_equal_the_model_in_those_modes(family_served):
    served, engine = family_served
    reference = Reference(served, "alpha")
    case = (served.names[0], QUESTIONS[0])
    with reference.model.slow_path_disabled():
        fast_only = reference.text(*case)
    with reference.model.disable_adapter():
        base = reference.text(*case)
    assert (
        engine.chat(messages(*case), model="alpha:fast-only", sampling=SamplingParams(max_tokens=8)).text == fast_only
    )
    assert engine.chat(messages(*case), model="base", sampling=SamplingParams(max_tokens=8)).text == base


class CharTokenizer:
    """One character per token id (ord); 0 ends the text."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens if t != 0)


def follow(text: str, stop=(), max_tokens=100, end=True) -> tuple[AnswerRow, list[str]]:
    pieces: list[str] = []
    row = AnswerRow(CharTokenizer(), frozenset({0}), max_tokens, tuple(stop), pieces.append)
    for token in [*map(ord, text), *([0] if end else [])]:
        row.add(token)
    return row, pieces


def test_answer_rows_cut_at_the_first_stop_string_and_never_stream_a_partial_one():
    row, pieces = follow("Hello. END of it", stop=["END", "of"])
    assert (row.text, row.finish_reason, "".join(pieces)) == ("Hello. ", "stop", "Hello. ")
    assert len(row.tokens) == len("Hello. END")  # ended at the step that completed the stop string
    row, pieces = follow("say EN then ENOUGH", stop=["END"])  # "EN" held back until it cannot start "END"
    assert "".join(pieces) == row.text == "say EN then ENOUGH" and row.finish_reason == "stop"
    assert all(not piece.endswith("E") and not piece.endswith("EN") for piece in pieces[:-1])
    row, pieces = follow("abcdef", max_tokens=3, end=False)
    assert (row.text, row.finish_reason, pieces) == ("abc", "length", ["a", "b", "c"])
    row, _ = follow("abc", end=False)
    row.cancel_now()
    row.add(ord("d"))
    assert (row.text, row.finish_reason) == ("abc", "cancelled")


def clip(nbytes: int) -> VideoClip:
    return VideoClip(np.zeros((1, 1, nbytes, 1), np.uint8), np.zeros(1, np.int64), 1.0, 1, "test")


def test_encode_cache_keeps_most_recent_entries_within_its_byte_bound():
    cache = EncodeCache(max_bytes=250)
    for key in "abc":
        cache.put(key, CachedVideos([clip(100)]))
    assert cache.peek("a") is None and cache.nbytes == 200 and cache.stats["evictions"] == 1
    assert cache.get("b") is not None  # b is now the most recent
    cache.put("d", CachedVideos([clip(100)]))
    assert cache.peek("c") is None and cache.peek("b") is not None
    cache.put("e", CachedVideos([clip(300)]))  # larger than the bound: nothing is kept
    assert len(cache) == 0 and cache.nbytes == 0
    assert cache.stats == {"hits": 1, "misses": 0, "evictions": 5}  # a, c, then b, d and e itself


def test_media_policy_keeps_local_files_inside_its_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "in.mp4").write_bytes(b"video")
    (outside / "secret.mp4").write_bytes(b"secret")
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    policy = MediaPolicy(media_roots=(root,), max_bytes=10)
    with load_media("in.mp4", "video", policy) as media:
        assert media.path == (root / "in.mp4").resolve()
    with load_media(f"file://{root / 'in.mp4'}", "video", policy) as media:
        assert media.path.read_bytes() == b"video"
    for url in ["link.mp4", "../outside/secret.mp4", str(outside / "secret.mp4"), "/etc/passwd"]:
        with pytest.raises(RequestError, match="no such file") as error, load_media(url, "video", policy):
            pass
        assert error.value.status == 404  # and the message names the file only as the client did:
        assert str(outside) not in str(error.value).replace(url, "<sent>")
    with pytest.raises(RequestError, match="reads no local files"), load_media("in.mp4", "video", MediaPolicy()):
        pass
    (root / "big.mp4").write_bytes(bytes(11))
    with pytest.raises(RequestError, match="limit") as error, load_media("big.mp4", "video", policy):
        pass
    assert error.value.status == 413
    with (
        load_media("in.mp4", "video", policy) as on_disk,
        load_media("data:video/mp4;base64,dmlkZW8=", "video", policy) as media,
    ):
        assert media.path.read_bytes() == b"video" and str(tmp_path) not in str(media.path)
        assert media.digest == on_disk.digest  # the same bytes, sent inline or named: one encode-cache entry
        temporary = media.path
    assert not temporary.exists()  # a data: URL's bytes are removed once read
    with pytest.raises(RequestError, match="malformed"), load_media("data:video/mp4;base64,%%%", "video", policy):
        pass


def test_seeded_requests_run_alone_and_greedy_ones_share_batches(family_served):
    _, engine = family_served
    greedy = ChatJob("alpha", [], SamplingParams())
    seeded = ChatJob("alpha", [], SamplingParams(temperature=1.0, seed=3))
    unseeded = ChatJob("alpha", [], SamplingParams(temperature=1.0))
    assert engine.batch_key(seeded) is None
    assert engine.batch_key(greedy) == engine.batch_key(ChatJob("alpha", [], SamplingParams(max_tokens=3)))
    assert engine.batch_key(unseeded) != engine.batch_key(greedy)


def test_close_ends_queued_jobs_with_a_503_and_finishes_the_running_one(tmp_path):
    import threading
    import time

    served = build_served(tmp_path, num_videos=1)
    engine = Engine.load(served.base, {"alpha": served.adapters["alpha"]}, media_roots=[served.videos],
                         settings=EngineSettings(num_frames=FRAMES, max_batch_size=1))  # fmt: skip
    first, second = (engine.prepare(ChatJob("alpha", messages(served.names[0], q))) for q in QUESTIONS[:2])
    with engine._model_lock:  # the worker takes the first job and waits here for the model
        engine.submit(first)
        while engine._queue:
            time.sleep(0.01)
        engine.submit(second)
        closing = threading.Thread(target=engine.close)
        closing.start()
        assert second.done.wait(10) and second.error.status == 503
    closing.join(30)
    assert first.result.text and first.error is None
    with pytest.raises(RequestError, match="shutting down"):
        engine.submit(engine.prepare(ChatJob("alpha", messages(served.names[0], "Again?"))))
