"""lmms-eval plugin for slowfast-adapter: registers the model id `slowfast_adapter` by entry point.

Importing this package loads nothing heavy: lmms-eval imports it at start-up to read `manifest`.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
"""Local lmms-eval tasks shipped with the plugin (`--include_path` this folder)."""


def manifest():
    """The entry point's payload: lmms-eval's `ModelManifest` for `--model slowfast_adapter`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="slowfast_adapter", simple_class_path="slowfast_lmms_eval.model.SlowFastLMM")
