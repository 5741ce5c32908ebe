"""The README's Python API block runs as written (a tiny local model folder stands in for the Hub id)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"
HUB_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


def test_the_python_api_block_runs(tiny_dirs, tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert f'model_id = "{HUB_ID}"' in code
    code = code.replace(HUB_ID, str(tiny_dirs("llava_onevision")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    model, inputs = namespace["model"], namespace["inputs"]
    assert "trainable params" in capsys.readouterr().out
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert model.active_adapter == "default" and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(**inputs).logits.shape[0] == 1
