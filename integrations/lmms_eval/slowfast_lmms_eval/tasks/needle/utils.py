"""Needle task: one video and one question per record, LLaVA-Video conversation format (see needle_data.py)."""

from __future__ import annotations

from pathlib import Path

COLORS = ["red", "green", "blue", "yellow"]  # slowfast_adapter.demo.needle_data.COLORS, in its order


def needle_doc_to_visual(doc: dict) -> list[str]:
    return [str(Path(doc["video"]).resolve())]  # relative to the working directory, as test.jsonl is


def needle_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["conversations"][0]["value"].replace("<video>", "").strip()


def needle_doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def needle_doc_to_choice(doc: dict) -> list[str]:
    return list(COLORS)


def needle_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The demo's rule: correct when the answer starts with the colour."""
    return {"accuracy": float(results[0].strip().startswith(needle_doc_to_target(doc)))}
