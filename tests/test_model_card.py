"""Model cards and `inspect` show the effective configuration and a base identity a reader can load."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForImageTextToText

import slowfast_adapter as sfa
from slowfast_adapter.cli import main
from slowfast_adapter.io.adapter_io import CONFIG_NAME, README_NAME
from slowfast_adapter.io.model_card import base_name


@pytest.mark.parametrize("family", ["llava_onevision"], indirect=True)
def test_a_relative_local_base_is_recorded_absolute_and_the_card_loads_it(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_dir.parent)
    relative = os.path.relpath(tiny_dir)
    base = AutoModelForImageTextToText.from_pretrained(relative)
    config = sfa.SlowFastConfig(hybrid_layers=[0, 1])
    sfa.wrap(base, config).save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["base_model"]["name_or_path"] == str(tiny_dir.resolve())
    card = (tmp_path / "adapter" / README_NAME).read_text()
    assert f'AutoModelForImageTextToText.from_pretrained("{tiny_dir.resolve()}")' in card
    assert "<the base model>" not in card
    # Effective values only: with explicit hybrid_layers the interval/start do not apply; without LoRA, no lora_*.
    card_config = json.loads(card.split("```json\n")[1].split("```")[0])
    assert card_config["hybrid_layers"] == [0, 1]
    assert not {"hybrid_layer_interval", "hybrid_layer_start", "lora_alpha"} & set(card_config)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "hybrid_layers: [0, 1]" in out and "hybrid_layer_interval" not in out


def test_a_hub_cache_snapshot_is_recorded_as_its_repo_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-onevision-qwen2-0.5b-ov-hf" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_name(str(snapshot)) == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    assert base_name("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"  # a Hub id stays as it is
