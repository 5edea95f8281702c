"""PackedBatch metadata and pad/unpad against boolean-indexing references and hand-built masks."""

import pytest
import torch

from trimformer.ops.varlen import PackedBatch, naive_pad, naive_padding_mask, naive_unpad, pad, unpad

LENS = [1, 2, 17, 64, 129]


def _padded(lens, side, s=None):
    s = s or max(lens)
    ids = torch.randint(5, 900, (len(lens), s))
    mask = torch.zeros(len(lens), s, dtype=torch.long)
    for i, n in enumerate(lens):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, s - n :] = 1
    return ids, mask


def test_from_token_lists_metadata():
    lists = [[7] * n for n in LENS]
    b = PackedBatch.from_token_lists(lists, position_offset=2)
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 1, 3, 20, 84, 213]
    assert isinstance(b.max_seqlen, int) and b.max_seqlen == 129
    assert b.num_tokens == 213 and b.num_seqs == 5 and b.seqlens == tuple(LENS)
    expected_pos = torch.cat([torch.arange(n) + 2 for n in LENS])
    assert torch.equal(b.position_ids, expected_pos)
    assert b.token_type_ids is None
    assert b.padded_len == 129 and b.row_starts == (0,) * 5


def test_from_token_lists_types_and_empty_sequences():
    b = PackedBatch.from_token_lists([[1, 2], [], [3]], [[0, 1], [], [1]])
    assert b.cu_seqlens.tolist() == [0, 2, 2, 3]
    assert b.input_ids.tolist() == [1, 2, 3] and b.token_type_ids.tolist() == [0, 1, 1]
    assert b.position_ids.tolist() == [0, 1, 0]
    empty = PackedBatch.from_token_lists([])
    assert empty.num_tokens == 0 and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0


def test_from_token_lists_rejects_mismatched_types():
    with pytest.raises(ValueError, match="sequence 1"):
        PackedBatch.from_token_lists([[1], [2, 3]], [[0], [0]])
    with pytest.raises(ValueError, match="2 sequences"):
        PackedBatch.from_token_lists([[1]], [[0], [0]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_from_padded_matches_boolean_indexing(side):
    ids, mask = _padded(LENS, side, s=131)
    types = torch.randint(0, 2, ids.shape)
    b = PackedBatch.from_padded(ids, mask, types, position_offset=1)
    sel = mask.bool()
    assert torch.equal(b.input_ids, ids[sel])
    assert torch.equal(b.token_type_ids, types[sel])
    assert b.seqlens == tuple(LENS) and b.max_seqlen == 129 and b.padded_len == 131
    # positions restart at each sequence whatever the padding side
    assert torch.equal(b.position_ids, torch.cat([torch.arange(n) + 1 for n in LENS]))
    assert torch.equal(naive_padding_mask(b), sel)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_unpad_match_naive(side):
    ids, mask = _padded(LENS, side, s=130)
    b = PackedBatch.from_padded(ids, mask)
    hidden = torch.randn(len(LENS), 130, 3, 4)
    packed = unpad(hidden, b)
    assert torch.equal(packed, naive_unpad(hidden, b))
    assert torch.equal(packed, hidden[mask.bool()])
    back = pad(packed, b)
    assert torch.equal(back, naive_pad(packed, b))
    assert torch.equal(back, hidden * mask[:, :, None, None])


def test_pad_of_token_list_batch_is_right_padded():
    b = PackedBatch.from_token_lists([[1, 2, 3], [4]])
    x = torch.arange(4.0)[:, None]
    assert pad(x, b)[:, :, 0].tolist() == [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]


def test_from_padded_rejects_bad_masks():
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="row 1 has gaps"):
        PackedBatch.from_padded(ids, torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        PackedBatch.from_padded(ids, torch.tensor([[1, 2, 0, 0], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        PackedBatch.from_padded(ids, torch.ones(2, 3))
    with pytest.raises(ValueError, match="input_ids must be"):
        PackedBatch.from_padded(torch.ones(4, dtype=torch.long), torch.ones(4))


def test_all_padding_row_is_an_empty_sequence():
    ids = torch.ones(2, 3, dtype=torch.long)
    b = PackedBatch.from_padded(ids, torch.tensor([[0, 0, 0], [0, 1, 1]]))
    assert b.seqlens == (0, 2) and b.cu_seqlens.tolist() == [0, 0, 2]
    assert pad(torch.ones(2, 1), b)[:, :, 0].tolist() == [[0, 0, 0], [0, 1, 1]]


def test_shape_errors_in_pad_unpad():
    b = PackedBatch.from_token_lists([[1, 2], [3]])
    with pytest.raises(ValueError, match="rows"):
        pad(torch.zeros(4, 2), b)
    with pytest.raises(ValueError, match="padded tensor"):
        unpad(torch.zeros(2, 3, 2), b)


def test_to_same_device_is_identity():
    b = PackedBatch.from_token_lists([[1, 2]])
    assert b.to("cpu") is b


def test_check_varlen_metadata_names_what_is_wrong():
    from trimformer.ops.varlen import check_varlen_metadata

    cpu = torch.device("cpu")
    check_varlen_metadata(torch.tensor([0, 3, 5], dtype=torch.int32), 3, cpu)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32 tensor"):
        check_varlen_metadata(torch.tensor([0, 3, 5]), 3, cpu)  # int64
    with pytest.raises(ValueError, match="N \\+ 1 >= 2 entries"):
        check_varlen_metadata(torch.tensor([0], dtype=torch.int32), 3, cpu)
    with pytest.raises(ValueError, match="max_seqlen must be a non-negative Python int"):
        check_varlen_metadata(torch.tensor([0, 3], dtype=torch.int32), torch.tensor(3), cpu)
    with pytest.raises(ValueError, match="cu_seqlens must be on meta"):
        check_varlen_metadata(torch.tensor([0, 3], dtype=torch.int32), 3, torch.device("meta"))
