"""Following each row of a batched `generate` token by token: its text so far, stop strings, streaming, cancelling.

`AnswerRows` is a `StoppingCriteria` that `generate` calls after every step with the sequences so far. It appends each
unfinished row's new token to that row's `AnswerRow`, which decodes the row's tokens, ends the row at the end-of-text
token, at its first stop string, at its own token limit or when its client went away, and hands the text that is
final (never a possible start of a stop string, never half a UTF-8 character) to the row's `on_text` callback. The
returned per-row flags make `generate` pad finished rows and stop once all are finished. The text of a finished row
is `AnswerRow.text` whether it was streamed or not, so streamed and non-streamed answers are equal by construction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria


@dataclass
class AnswerRow:
    """One answer being generated.

    stop: strings that end the answer (left out of it); max_tokens: this row's limit (a batch runs to its longest);
    on_text: called with each new piece of final text; cancelled: set when the client is gone (the row then ends at
    the next step, freeing its place in the batch)."""

    tokenizer: object
    eos_ids: frozenset[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of text or a stop string), "length", "cancelled"
    text: str = ""  # the answer's text so far, final once `finish_reason` is set
    emitted: int = 0  # characters of `text` handed to `on_text`

    def add(self, token: int) -> None:
        """Append the next generated token and update the text and the finish reason."""
        if self.finish_reason is not None:
            return
        self.tokens.append(token)
        ended = token in self.eos_ids
        content = self.tokens[:-1] if ended else self.tokens
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        self.text = text
        if ended:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        self._emit()

    def cancel_now(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _emit(self) -> None:
        if self.on_text is None:
            return
        ready = len(self.text)
        if self.finish_reason is None:  # hold back what may still change
            if self.text.endswith("\ufffd"):
                ready = len(self.text.rstrip("\ufffd"))
            for stop in self.stop:
                for size in range(min(len(stop) - 1, ready), 0, -1):
                    if self.text[:ready].endswith(stop[:size]):
                        ready -= size
                        break
        if ready > self.emitted:
            piece, self.emitted = self.text[self.emitted : ready], ready
            self.on_text(piece)


class AnswerRows(StoppingCriteria):
    """`generate`'s view of a batch's `AnswerRow`s: feeds each step's tokens to them, returns which rows are done."""

    def __init__(self, rows: list[AnswerRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()  # the step's tokens, on the host: text needs them (one read per step)
        for row, token in zip(self.rows, tokens, strict=True):
            if row.cancelled.is_set():
                row.cancel_now()
            row.add(token)
        done = [row.finish_reason is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
