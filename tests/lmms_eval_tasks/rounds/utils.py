"""A two-round needle task: round 1 asks the demo's question, round 2 asks it again in other words."""

from __future__ import annotations

from pathlib import Path

QUESTIONS = ["What color is the square?", "Which color was the square?"]


def rounds_doc_to_visual(doc: dict) -> list[str]:
    return [str(Path(doc["video"]).resolve())]  # relative to the working directory, as test.jsonl is


def rounds_doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def rounds_doc_to_text(
    doc: dict,
    lmms_eval_specific_kwargs: dict | None = None,
    previous_output: list[str] | None = None,
    round_idx: int | None = None,
    previous_round_info: dict | None = None,
):
    """The first question; then, as lmms-eval's multi-round models call it after each round, the next round's
    (visuals, question, done, previous outputs, round info)."""
    if round_idx is None:
        return QUESTIONS[0]
    if round_idx < len(QUESTIONS):
        return rounds_doc_to_visual(doc), QUESTIONS[round_idx], False, previous_output, {"round": round_idx}
    return None, None, True, previous_output, None


def rounds_process_results(doc: dict, results: list) -> dict[str, float]:
    """Correct when there are both rounds' answers and each starts with the colour."""
    rounds = results[0]
    right = all(answer.strip().startswith(rounds_doc_to_target(doc)) for answer in rounds)
    return {"accuracy": float(len(rounds) == len(QUESTIONS) and right)}
