"""Inference: reading videos for the model (the `[eval]` extra: decord on x86_64, PyAV).

Imports nothing from `slowfast_adapter.training`: the evaluation connectors (lmms-eval plugin, Gradio app) run on it
without the training stack.
"""
