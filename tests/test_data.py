"""Video sampling, the LLaVA-format dataset, assistant-only labels (every tiny family) and the collator."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from slowfast_adapter import wrap
from slowfast_adapter.config import SlowFastConfig
from slowfast_adapter.inference.video import VideoReadError, read_clip, sample_indices, uniform_indices
from slowfast_adapter.tools.tiny import TINY_BUILDERS, random_video, write_mp4
from slowfast_adapter.training.data import (
    IGNORE_INDEX,
    ConversationCollator,
    ConversationDataset,
    load_records,
    to_messages,
)

QUESTION, ANSWER, FOLLOW_UP, ANSWER2 = "What color is the square?", "It is red.", "Is it moving?", "Yes, left."


def ramp_video(num_frames: int) -> np.ndarray:
    frames = np.zeros((num_frames, 32, 32, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = 5 * t  # frame t is a flat grey of value 5 t
    return frames


def test_sample_indices_uniform_fps_and_cap():
    assert sample_indices(80, 8.0, num_frames=5).tolist() == uniform_indices(80, 5).tolist()
    assert sample_indices(80, 8.0, fps=1).tolist() == list(range(0, 80, 8))  # 10 s at 1 fps
    assert sample_indices(80, 8.0, fps=1, max_frames=4).tolist() == uniform_indices(80, 4).tolist()
    assert sample_indices(10, 8.0, fps=30).tolist() == list(range(10))  # never more frames than the file has
    assert sample_indices(3, 8.0, fps=0.1).tolist() == [0]  # at least one frame
    with pytest.raises(ValueError, match="exactly one"):
        sample_indices(10, 8.0, num_frames=2, fps=1)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_read_clip_at_target_fps_with_cap(tmp_path, backend):
    path = write_mp4(tmp_path / "ramp.mp4", ramp_video(40), fps=8)  # 5 s
    clip = read_clip(path, fps=2, backend=backend)
    assert clip.total_frames == 40 and clip.native_fps == pytest.approx(8)
    assert clip.indices.tolist() == list(range(0, 40, 4))
    np.testing.assert_allclose(clip.frames.reshape(10, -1).mean(1), 5 * clip.indices, atol=3)
    np.testing.assert_allclose(clip.timestamps, np.arange(10) * 0.5)
    capped = read_clip(path, fps=2, max_frames=4, backend=backend)
    assert capped.indices.tolist() == uniform_indices(40, 4).tolist()
    np.testing.assert_allclose(capped.frames.reshape(4, -1).mean(1), 5 * capped.indices, atol=3)
    meta = capped.metadata()
    assert meta.frames_indices == capped.indices.tolist() and meta.fps == pytest.approx(8)


def test_records_json_and_jsonl_and_messages(tmp_path):
    record = {
        "id": "a",
        "video": "a.mp4",
        "conversations": [{"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}],
    }
    (tmp_path / "d.json").write_text(json.dumps([record]))
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    assert load_records(tmp_path / "d.json") == [record]
    assert load_records(tmp_path / "d.jsonl") == [record, record]
    messages = to_messages(record)
    assert messages[0] == {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}
    untagged = {**record, "conversations": [{"from": "human", "value": QUESTION}, record["conversations"][1]]}
    assert to_messages(untagged)[0]["content"][0] == {"type": "video"}  # untagged media open the first turn
    with pytest.raises(ValueError, match="2 <video> tags"):
        to_messages({**record, "conversations": [{"from": "human", "value": "<video><video>x"}, {"from": "gpt"}]})
    with pytest.raises(ValueError, match="no gpt/assistant turn"):
        to_messages({**record, "conversations": record["conversations"][:1]})


def _write_dataset(tmp_path) -> list[dict]:
    write_mp4(tmp_path / "long.mp4", random_video(20, seed=1), fps=8)
    write_mp4(tmp_path / "short.mp4", random_video(8, seed=2), fps=8)
    Image.fromarray(random_video(1, size=40, seed=3)[0]).save(tmp_path / "still.png")
    two_turns = [
        {"from": "human", "value": f"<video>\n{QUESTION}"},
        {"from": "gpt", "value": ANSWER},
        {"from": "human", "value": FOLLOW_UP},
        {"from": "gpt", "value": ANSWER2},
    ]
    return [
        {"id": "long", "video": "long.mp4", "conversations": two_turns},
        {"id": "short", "video": "short.mp4", "conversations": two_turns[:2]},
        {"id": "text", "conversations": [{"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": ANSWER2}]},
        {
            "id": "img",
            "image": "still.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}] + [{"from": "gpt", "value": ANSWER}],
        },
    ]


def _labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for token in labels.tolist() + [IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_only_assistant_tokens_carry_labels(tmp_path, family):
    """Per family chat template: each labelled run is one assistant reply (+ its end-of-turn token), nothing else."""
    model, processor = TINY_BUILDERS[family]()
    records = _write_dataset(tmp_path)
    dataset = ConversationDataset(records, processor, media_root=tmp_path, fps=4, max_frames=6)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = ConversationCollator(processor)([*samples])
    tokenizer = processor.tokenizer
    expected_replies = [[ANSWER, ANSWER2], [ANSWER], [ANSWER2], [ANSWER]]
    collator = ConversationCollator(processor)
    for row, replies in enumerate(expected_replies):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        assert not labelled[batch["attention_mask"][row] == 0].any()
        assert not torch.isin(ids[labelled], torch.tensor(collator.visual_token_ids)).any()
        runs = _labelled_runs(labels)
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies, strict=True):
            text = tokenizer.decode(run)
            assert text.startswith(reply), (text, reply)  # no role header before the reply
            assert tokenizer.decode(run, skip_special_tokens=True).strip() == reply
            assert run[-1] in tokenizer.all_special_ids  # the end-of-turn marker is trained on
        unlabelled = tokenizer.decode(ids[~labelled & (batch["attention_mask"][row] == 1)])
        assert ANSWER not in unlabelled and ANSWER2 not in unlabelled
    # The prompt text and the question are in the sequence but never labelled.
    assert QUESTION in tokenizer.decode(batch["input_ids"][0])


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_collator_batches_variable_frame_counts(tmp_path, family):
    """Videos of 8 and 4 frames (fps sampling) in one batch: the wrapped model trains on the batch."""
    model, processor = TINY_BUILDERS[family]()
    records = _write_dataset(tmp_path)[:2]
    dataset = ConversationDataset(records, processor, media_root=tmp_path, fps=4, max_frames=16, frame_multiple=4)
    samples = [dataset[0], dataset[1]]
    assert [len(s.videos[0]) for s in samples] == [8, 4]  # 10 frames at 4 fps, rounded down to a multiple of 4
    batch = ConversationCollator(processor)(samples)
    config = SlowFastConfig(min_fast_frames=2, temporal_pooling_stride=2, hybrid_layer_interval=2)
    wrapped = wrap(model, config)
    loss = wrapped(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in wrapped.slow_branches.parameters())


def test_bad_video_error_names_file_or_is_skipped(tmp_path, processor, caplog):
    records = _write_dataset(tmp_path)[:2]
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    records[0] = {**records[0], "video": "broken.mp4"}
    strict = ConversationDataset(records, processor, media_root=tmp_path, num_frames=4)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        strict[0]
    lenient = ConversationDataset(records, processor, media_root=tmp_path, num_frames=4, skip_bad_videos=True)
    with caplog.at_level(logging.WARNING, logger="slowfast_adapter.training.data"):
        sample = lenient[0]
    assert sample.record_id == "short" and sample.videos[0].shape[0] == 4  # the next readable record
    assert "broken.mp4" in caplog.text and "Skipping record 0" in caplog.text
    assert list(lenient.skipped) == [0]
