"""notebooks/walkthrough.ipynb: executed top to bottom in a fresh kernel, and its committed outputs checked.

The executed run builds its own base (no demo output in its temporary working directory) and takes 2 to 3 minutes
on 2 quiet CPU cores. It needs the `notebook` extra (nbclient, nbformat, ipykernel); without it that test is skipped.
The committed notebook's outputs are checked with the standard library only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

import slowfast_adapter

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 900


def execute_notebook(path: Path, workdir: Path) -> Any:
    """Run the notebook at `path` in a fresh kernel whose working directory is `workdir`; return the executed
    notebook (the file itself is not modified).

    The kernel is `python -m ipykernel_launcher` of this interpreter (not whatever kernelspec named python3 is
    installed elsewhere), and it imports the same slowfast_adapter package as this process."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    notebook = nbformat.read(path, as_version=4)
    package_root = str(Path(slowfast_adapter.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("MPLBACKEND", None)  # the notebook's figures are inline
    kernels = KernelSpecManager(kernel_dirs=[])  # only the native kernel: this interpreter
    client = nbclient.NotebookClient(
        notebook,
        km=KernelManager(kernel_name="python3", kernel_spec_manager=kernels),
        timeout=CELL_TIMEOUT_S,
        coalesce_streams=True,  # progress bars: their last state, not every redraw
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)
    return notebook


def cell_text(cell: dict, stream: str = "stdout") -> str:
    text = "".join(
        "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
        for o in cell.get("outputs", [])
        if o["output_type"] == "stream" and o["name"] == stream
    )
    return text


def summary_of(notebook: dict) -> dict[str, Any]:
    """The JSON object the cell tagged `summary` printed."""
    cells = [c for c in notebook["cells"] if "summary" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "one cell must be tagged 'summary'"
    return json.loads(cell_text(cells[0]))


def printed_trainable_parameters(notebook: dict) -> int:
    """N from the `trainable params: N || ...` line that `model.print_trainable_parameters()` printed."""
    found = [re.search(r"trainable params: ([\d,]+) \|\|", cell_text(c)) for c in notebook["cells"]]
    found = [m for m in found if m]
    assert len(found) == 1, "print_trainable_parameters() must print once"
    return int(found[0].group(1).replace(",", ""))


def check_run(notebook: dict) -> dict[str, Any]:
    """What every run of the notebook must show; returns its summary."""
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
            assert not errors, f"error output in cell {''.join(cell['source'])[:80]!r}: {errors[0].get('ename')}"
            assert cell.get("execution_count") is not None, "every code cell ran"
    summary = summary_of(notebook)
    accuracy = summary["accuracy"]
    base, fast, slowfast, base_all = (
        accuracy[k]
        for k in (
            "(a) base, native frames",
            "(b) fast tokens only",
            "(c) slow-fast adapter",
            "(d) base, all native tokens",
        )
    )
    assert slowfast >= 0.9, summary  # the adapter finds the needle
    assert slowfast >= fast + 0.3, summary  # fast tokens drop or halve it
    assert slowfast >= base + 0.3, summary  # 8 frames of 32 usually miss it
    assert slowfast >= base_all - 0.02, summary  # as good as every native token in the sequence, or better
    flops = summary["llm_prefill_mflop"]
    assert flops["(b) fast tokens only"] < flops["(c) slow-fast adapter"] < flops["(d) base, all native tokens"]
    assert summary["needle_peak_fraction"] > 0.5, summary  # where it looked: mostly at the needle's frame
    assert summary["reload_max_abs_logit_diff"] == 0.0, summary
    trainable = summary["trainable_parameters"]
    assert trainable == printed_trainable_parameters(notebook) == expected_trainable_parameters()  # the shapes' count
    # the trainer's optimizer and the saved file hold exactly those parameters
    assert trainable == summary["trainer_trainable_parameters"] == summary["adapter_file_parameters"]
    assert 0 < trainable < summary["total_parameters"] / 10
    assert 1.0 < summary["flops_7b_llm_prefill_ratio_128f_vs_base_16f"] < 1.05  # README: 1.019x
    return summary


def expected_trainable_parameters() -> int:
    """The adapter's parameter count worked out from the shapes of the notebook's base (DemoConfig), not by the
    library: per hybrid layer kv_proj (D -> 2 x kv, with bias), gate_proj (D -> 1, with bias) and alpha."""
    from slowfast_adapter.demo.experiment import DemoConfig

    config = DemoConfig()
    text = config.build_base()[0].config.text_config
    D = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or D // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    layers = len(config.slowfast["hybrid_layers"])
    return layers * ((D * 2 * kv + 2 * kv) + (D + 1) + 1)


def test_committed_notebook_holds_the_outputs_of_a_run() -> None:
    assert NOTEBOOK.stat().st_size < 1_000_000
    notebook = json.loads(NOTEBOOK.read_text())
    check_run(notebook)
    images = [o for c in notebook["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # frames, loss curves, accuracy bars, where it looked


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_notebook_runs_top_to_bottom(tmp_path: Path) -> None:
    committed = NOTEBOOK.read_bytes()
    notebook = execute_notebook(NOTEBOOK, tmp_path)
    assert NOTEBOOK.read_bytes() == committed  # executed in memory, in tmp_path
    check_run(notebook)
    assert (tmp_path / "walkthrough-output" / "adapter" / "adapter_model.safetensors").is_file()
