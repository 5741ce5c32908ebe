import pytest
import torch

from slowfast_adapter.core.sequence import compact_tokens, padding_side, placeholder_item_rows, placeholder_keep_mask

V, P = 9, 0  # placeholder token id, pad id


def test_adjacent_items_keep_their_own_first_tokens():
    # sample 0: two videos back to back (3 tokens each); sample 1: one video
    ids = torch.tensor([[1, V, V, V, V, V, V, 2], [P, P, 1, V, V, V, 2, 3]])
    lengths = torch.tensor([3, 3, 3])
    keep = placeholder_keep_mask(ids, V, lengths, torch.tensor([1, 2, 1]))
    assert keep.tolist() == [
        [True, True, False, False, True, True, False, True],
        [True, True, True, True, False, False, True, True],
    ]
    assert placeholder_item_rows(ids, V, lengths, what="video").tolist() == [0, 0, 1]


def test_placeholder_count_mismatch_is_a_clear_error():
    ids = torch.tensor([[1, V, V, 2]])
    with pytest.raises(ValueError, match="holds 2 video placeholder tokens but the video inputs need 3"):
        placeholder_item_rows(ids, V, torch.tensor([3]), what="video")


@pytest.mark.parametrize("side", ["left", "right"])
def test_compaction_repads_on_the_same_side_and_keeps_tensors_aligned(side):
    ids = torch.tensor([[5, V, V, V, 6, 7], [5, 6, 7, 8, 4, 4]])
    mask = torch.ones_like(ids)
    labels = ids * 10
    keep = placeholder_keep_mask(ids, V, torch.tensor([3]), torch.tensor([1]))
    out = compact_tokens(keep, {"ids": (ids, P), "mask": (mask, 0), "labels": (labels, -100)}, side=side)
    if side == "left":
        assert out["ids"].tolist() == [[P, P, 5, V, 6, 7], [5, 6, 7, 8, 4, 4]]
        assert out["mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
        assert out["labels"][0].tolist() == [-100, -100, 50, V * 10, 60, 70]
    else:
        assert out["ids"].tolist() == [[5, V, 6, 7, P, P], [5, 6, 7, 8, 4, 4]]
        assert out["labels"][0].tolist() == [50, V * 10, 60, 70, -100, -100]


def test_compaction_of_3d_positions():
    keep = torch.tensor([[True, False, True]])
    pos = torch.arange(9).view(3, 1, 3)
    out = compact_tokens(keep, {"pos": (pos, 1)}, side="right")["pos"]
    assert out.tolist() == [[[0, 2]], [[3, 5]], [[6, 8]]]


def test_padding_side_detection():
    assert padding_side(torch.tensor([[0, 1, 1], [1, 1, 1]])) == "left"
    assert padding_side(torch.tensor([[1, 1, 0], [1, 1, 1]])) == "right"
    assert padding_side(None) == "left"
