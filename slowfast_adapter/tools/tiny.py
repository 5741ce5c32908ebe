"""Tiny, random, offline video MLLMs and test videos.

Everything here is built from configs (no hub access): a byte-level BPE tokenizer trained in memory,
the family's stock processor, and a few-layer random model. `save_tiny_llava_onevision(dir)` writes
both to a folder so that the real `from_pretrained` code paths can be exercised.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<video>\n{% elif item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_CORPUS = [
    "What is happening in this video? Describe the colours and the shapes.",
    "A red square moves to the left while a blue circle stays still.",
    "The answer is yes. The answer is no. red green blue yellow white black",
    "What color is the star? It is green. How many frames? There are sixteen.",
    "user assistant system: You are a helpful assistant that watches videos.",
]


def build_tiny_tokenizer(vocab_size: int = 384, *, image_token: str = "<image>", video_token: str = "<video>"):
    """Byte-level BPE trained in memory on a small corpus, with the special tokens video MLLMs use.

    `image_token` / `video_token` name the placeholders the family's processor expands.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    colours = ["red", "green", "blue", "yellow", "white", "black"] * 100  # common answers: single tokens
    tok.train_from_iterator(_CORPUS * 4 + colours, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": image_token, "video_token": video_token},
    )


def _text_config_kwargs(
    tokenizer, hidden_size: int, num_layers: int, num_kv_heads: int = 2, intermediate_size: int | None = None
) -> dict:
    """A small Qwen-style decoder: 4 heads, `num_kv_heads` KV heads (GQA), the tokenizer's special ids."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
    )


def _random_init(model_cls, config, *, attn_implementation: str, seed: int, lm_head_scale: float = 8.0):
    """Seeded random model in eval mode; the LM head is scaled (by default) so greedy decoding is decisive."""
    from ..core import surface

    surface.set_attention_implementation(config, attn_implementation)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    return model


def build_tiny_llava_onevision(
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    image_size: int = 32,
    patch_size: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    lm_head_scale: float = 8.0,
):
    """A random LLaVA-OneVision model and its stock processor.

    Returns `(model, processor)`. Frames are `image_size` px; the vision tower sees
    `(image_size / patch_size)**2` patches per frame, pooled 2x2 by the model into
    `ceil(image_size / patch_size / 2)**2` video tokens per frame.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_tiny_tokenizer()
    text_config = Qwen2Config(
        **_text_config_kwargs(tokenizer, hidden_size, num_layers, num_kv_heads, intermediate_size),
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    model = _random_init(
        LlavaOnevisionForConditionalGeneration,
        config,
        attn_implementation=attn_implementation,
        seed=seed,
        lm_head_scale=lm_head_scale,
    )

    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny_llava_onevision(directory: str | os.PathLike, **kwargs) -> Path:
    """Build a tiny LLaVA-OneVision model and save model + processor to `directory`."""
    return save_tiny("llava_onevision", directory, **kwargs)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>"
)  # Qwen3-VL's processor writes vision_start/end around each temporal group itself


def _build_tiny_qwen(
    kind: str,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    image_size: int = 32,
    patch_size: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A random Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (`kind`) and its stock processor."""
    import transformers as tf

    tokenizer = build_tiny_tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]}  # fmt: skip
    head_dim = hidden_size // 4
    text = _text_config_kwargs(tokenizer, hidden_size, num_layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
        config_cls, model_cls, processor_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64, window_size=2 * patch_size * 2,
                      fullatt_block_indexes=[1], tokens_per_second=2)  # fmt: skip
        config_cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        processor_cls = tf.Qwen2_5_VLProcessor
    elif kind == "qwen3_vl":
        text.update(head_dim=head_dim)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        vision.update(hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])  # fmt: skip
        config_cls, model_cls, processor_cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
    else:
        raise ValueError(f"unknown Qwen kind {kind!r}")
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    model = _random_init(model_cls, config, attn_implementation=attn_implementation, seed=seed)

    size = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}
    common = dict(size=size, patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    if kind == "qwen3_vl":  # its video size bounds count pixels over time (t * h * w); keep every given frame
        video_kwargs = {"size": {**size, "longest_edge": 1024 * image_size * image_size}, "do_sample_frames": False}
    else:
        video_kwargs = {"cap_pixels_per_frame": True}
    image_processor_cls = tf.Qwen2VLImageProcessor
    video_processor_cls = tf.Qwen3VLVideoProcessor if kind == "qwen3_vl" else tf.Qwen2VLVideoProcessor
    image_processor = image_processor_cls(**common)
    video_processor = video_processor_cls(**{**common, **video_kwargs})
    template = QWEN3_CHAT_TEMPLATE if kind == "qwen3_vl" else QWEN_CHAT_TEMPLATE
    processor = processor_cls(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, chat_template=template
    )
    return model, processor


def build_tiny_qwen2_vl(**kwargs):
    """A random Qwen2-VL model and its stock processor (see `_build_tiny_qwen`)."""
    return _build_tiny_qwen("qwen2_vl", **kwargs)


def build_tiny_qwen2_5_vl(**kwargs):
    """A random Qwen2.5-VL model and its stock processor (see `_build_tiny_qwen`)."""
    return _build_tiny_qwen("qwen2_5_vl", **kwargs)


def build_tiny_qwen3_vl(**kwargs):
    """A random Qwen3-VL model and its stock processor (see `_build_tiny_qwen`)."""
    return _build_tiny_qwen("qwen3_vl", **kwargs)


TINY_BUILDERS = {
    "llava_onevision": build_tiny_llava_onevision,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
}
"""Family name -> builder returning `(model, processor)`; every supported family has one."""


def save_tiny(family: str, directory: str | os.PathLike, **kwargs) -> Path:
    """Build the tiny model of `family` and save model + processor to `directory`."""
    directory = Path(directory)
    model, processor = TINY_BUILDERS[family](**kwargs)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def random_video(num_frames: int, size: int = 32, *, seed: int = 0) -> np.ndarray:
    """A random uint8 video of shape `(num_frames, size, size, 3)`."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_frames, size, size, 3), dtype=np.uint8)


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 8,
    *,
    times: Sequence[float] | None = None,
    keyframe_interval: int | None = None,
) -> Path:
    """Write `frames` (T, H, W, 3) uint8 to an H.264 mp4 with PyAV (H and W must be even).

    `times`: [T] increasing seconds at which each frame is shown (a variable frame rate, millisecond precision);
    by default frame t is shown at t / fps. `keyframe_interval`: frames between key frames (x264's default 250).
    """
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", **({"g": str(keyframe_interval)} if keyframe_interval else {})}
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for t, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if times is not None:
                video_frame.pts, video_frame.time_base = round(times[t] * 1000), Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
