"""Training-free visual-token pruning to a token budget: the baselines a user could pick instead of an adapter.

Both rules read one video's native tokens, frames [T, N, D] (N tokens per frame, in the base's own order), and return
a keep mask [T, N] with exactly `budget` True entries; `keep_tokens` then gathers the kept tokens in sequence order
(frame by frame, each frame's tokens in their native order), which is what the base model sees instead of its
T * N native tokens. Our own implementations of the published rules (no code copied):

- `evs_keep_mask`, EVS ("Efficient Video Sampling", arXiv 2510.14624; vLLM's `video_pruning_rate`): a token's score
  is its change from the same position in the previous frame, 1 - cosine similarity of the two embeddings; the first
  frame is kept whole; the `budget` highest scores are kept (ties: the earlier token).
- `vidcom2_keep_mask`, VidCom2-style ("Video Compression Commander", arXiv 2505.14454): frames that differ more from
  the whole video get a larger share of the budget (softmax over frame uniqueness), and inside each frame the tokens
  least similar to their frame's and the video's mean token are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRUNING_RULES = ("evs", "vidcom2")


def _check(frames: torch.Tensor, budget: int) -> None:
    if frames.dim() != 3:
        raise ValueError(f"frames must be [T, N, D], got shape {tuple(frames.shape)}.")
    if not 0 < budget <= frames.shape[0] * frames.shape[1]:
        raise ValueError(f"budget must be in 1..{frames.shape[0] * frames.shape[1]} (T * N), got {budget}.")


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of `scores` [M] with the `count` highest True; ties go to the lower index (a stable sort)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:count]] = True
    return keep


def evs_scores(frames: torch.Tensor) -> torch.Tensor:
    """frames [T, N, D] -> [T, N] EVS change scores: 1 - cos(token, the same token of the previous frame); the first
    frame's tokens score +inf (always kept first)."""
    change = 1 - F.cosine_similarity(frames[1:].float(), frames[:-1].float(), dim=-1)  # [T-1, N]
    first = torch.full_like(frames[0, :, 0], float("inf"), dtype=change.dtype)[None]
    return torch.cat([first, change])


def evs_keep_mask(frames: torch.Tensor, budget: int) -> torch.Tensor:
    """frames [T, N, D] -> keep [T, N] bool with exactly `budget` True: the first frame (as far as the budget
    allows), then the tokens that changed most from the previous frame."""
    _check(frames, budget)
    return _top(evs_scores(frames).flatten(), budget).view(frames.shape[:2])


def frame_budgets(frames: torch.Tensor, budget: int, *, temperature: float = 0.01) -> torch.Tensor:
    """[T] tokens per frame summing to `budget`, none above N: each frame's share is a softmax over its uniqueness
    (minus the cosine similarity of its mean token to the video's mean token) at `temperature`; shares are rounded
    by largest remainder, and what a full frame cannot take goes to the next-largest shares."""
    per_frame = frames.shape[1]
    means = frames.float().mean(1)  # [T, D]
    uniqueness = -F.cosine_similarity(means, means.mean(0, keepdim=True), dim=-1)  # [T]
    share = torch.softmax(uniqueness / temperature, dim=0) * budget
    counts = share.floor().long().clamp(max=per_frame)
    while int(counts.sum()) < budget:  # largest remainder first, among frames with room left
        behind = torch.where(counts < per_frame, share - counts, torch.full_like(share, -float("inf")))
        counts[int(behind.argmax())] += 1
    return counts


def vidcom2_keep_mask(frames: torch.Tensor, budget: int, *, temperature: float = 0.01) -> torch.Tensor:
    """frames [T, N, D] -> keep [T, N] bool with exactly `budget` True: `frame_budgets` tokens in each frame, those
    least similar to their frame's mean token plus the video's mean token (the most distinct ones)."""
    _check(frames, budget)
    x = frames.float()
    frame_mean, video_mean = x.mean(1, keepdim=True), x.mean((0, 1), keepdim=True)  # [T, 1, D], [1, 1, D]
    distinct = -(F.cosine_similarity(x, frame_mean, dim=-1) + F.cosine_similarity(x, video_mean, dim=-1))  # [T, N]
    keep = torch.zeros(frames.shape[:2], dtype=torch.bool, device=frames.device)
    for t, count in enumerate(frame_budgets(frames, budget, temperature=temperature).tolist()):
        keep[t] = _top(distinct[t], count)
    return keep


def keep_mask(rule: str, frames: torch.Tensor, budget: int) -> torch.Tensor:
    """The keep mask [T, N] of `rule` (one of `PRUNING_RULES`) for frames [T, N, D]."""
    if rule == "evs":
        return evs_keep_mask(frames, budget)
    if rule == "vidcom2":
        return vidcom2_keep_mask(frames, budget)
    raise ValueError(f"rule must be one of {list(PRUNING_RULES)}, got {rule!r}.")


def keep_tokens(frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """frames [T, N, D], keep [T, N] -> the kept tokens [K, D] in sequence order (frame by frame)."""
    return frames[keep]
