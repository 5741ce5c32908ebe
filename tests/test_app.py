"""The Gradio demo app (integrations/gradio_app), tested for real: a tiny base + adapter saved to disk, needle videos
written as mp4, the server started on localhost, driven with gradio_client, then stopped. Skipped without gradio."""

from __future__ import annotations

import socket
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from test_generation import perturb_branches  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import slowfast_adapter as sfa  # noqa: E402
from slowfast_adapter.demo.needle_data import QUESTION, write_split  # noqa: E402
from slowfast_adapter.inference.video import read_clip  # noqa: E402
from slowfast_adapter.tools.tiny import save_tiny_llava_onevision  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[1] / "integrations" / "gradio_app"
FRAMES = 8  # min_fast_frames 2 x sampling stride 2 x pooling stride 2: the adapter's own frame count


@pytest.fixture(scope="module")
def app_module():
    sys.path.insert(0, str(APP_DIR))
    try:
        import app

        yield app
    finally:
        sys.path.remove(str(APP_DIR))
        for name in ("app", "video_qa", "figures"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA-OneVision base, an adapter with open gates (so the slow path changes answers and the map is not
    zero), and two needle videos of 8 frames, laid out as `slowfast-adapter demo` writes them."""
    root = tmp_path_factory.mktemp("demo-output")
    save_tiny_llava_onevision(root / "pretrained-base")
    config = sfa.SlowFastConfig(
        temporal_sampling_stride=2, temporal_pooling_stride=2, min_fast_frames=2, hybrid_layers=[0, 1]
    )
    model = sfa.wrap(AutoModelForImageTextToText.from_pretrained(root / "pretrained-base"), config)
    perturb_branches(model)
    model.save_pretrained(root / "adapter")
    write_split(root / "data", "test", 2, num_frames=FRAMES, size=32, needle_size=8)
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_module, demo_dir):
    """The app on a free localhost port (parsed from the same arguments as the command line), stopped afterwards."""
    port = _free_port()
    args = app_module.parse_args(
        ["--base", str(demo_dir / "pretrained-base"), "--adapter", str(demo_dir / "adapter"),
         "--samples", str(demo_dir / "data/test"), "--port", str(port)]
    )  # fmt: skip
    qa = app_module.VideoQA.load(args.base, args.adapter, num_frames=args.frames, max_new_tokens=args.max_new_tokens)
    assert qa.num_frames == FRAMES
    samples = app_module.sample_videos(args.samples)
    demo = app_module.build_app(qa, samples)
    demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://{args.host}:{port}/", samples
    finally:
        demo.close()


def _direct_answers(demo_dir: Path, video: str, question: str) -> tuple[str, str]:
    """Slow-fast and fast-only answers of a freshly loaded model, with plain `generate` (no cache)."""
    processor = AutoProcessor.from_pretrained(demo_dir / "pretrained-base")
    base = AutoModelForImageTextToText.from_pretrained(demo_dir / "pretrained-base")
    model = sfa.SlowFastModel.from_pretrained(base, demo_dir / "adapter").eval()
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=read_clip(video, FRAMES).frames, return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    answers = []
    for disabled in (False, True):
        with model.slow_path_disabled() if disabled else nullcontext():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answers.append(processor.decode(output[0, length:], skip_special_tokens=True).strip())
    return answers[0], answers[1]


def test_app_answers_like_the_model_and_reuses_the_video(server, demo_dir):
    url, samples = server
    assert len(samples) == 2 and all("square in frame" in label for label in samples)
    video = next(iter(samples.values()))
    client = gradio_client.Client(url, verbose=False)
    upload = gradio_client.handle_file(video)

    slowfast, fast_only, gallery, _plot, values, status = client.predict(upload, QUESTION, api_name="/ask")
    assert (slowfast, fast_only) == _direct_answers(demo_dir, video, QUESTION)
    assert slowfast != fast_only  # the open gates make the slow path matter
    assert len(values["per_frame"]) == len(values["timestamps"]) == FRAMES  # one value per frame
    assert min(values["per_frame"]) >= 0 and max(values["per_frame"]) > 0  # open gates: the answer read the frames
    assert values["timestamps"] == pytest.approx(read_clip(video, FRAMES).timestamps.tolist())
    assert values["unit"] == "frame" and values["fast"] == [0, 2, 4, 6]  # 8 frames: keep every 2nd, average pairs
    assert len(gallery) == 2
    assert "encoded on this question" in status

    follow_up = "Is there a square?"
    slowfast_2, fast_only_2, _, _, values_2, status_2 = client.predict(upload, follow_up, api_name="/ask")
    # one encoding for both questions and both answers; 3 uses per question: the map's run, and the engine's
    # fast-only answer (its prompt measured against the context, then generated)
    assert "video features reused" in status_2 and "cache hits: 6; encoded once: 1 miss" in status_2
    assert (slowfast_2, fast_only_2) == _direct_answers(demo_dir, video, follow_up)
    assert len(values_2["per_frame"]) == FRAMES


def test_missing_default_model_says_what_to_run(app_module, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        app_module.parse_args([])
    assert exit_info.value.code == 2
    assert "run `slowfast-adapter demo` first, or pass --base/--adapter" in capsys.readouterr().err
