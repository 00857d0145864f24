"""Packing rollouts into a batch: which positions predict response tokens."""

import torch

from tip_cli.rollout import left_pad, pack, trim_at_eos


def test_trim_keeps_the_first_eos():
    assert trim_at_eos([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert trim_at_eos([5, 6], {2}) == [5, 6]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_pack_marks_positions_that_predict_response_tokens():
    prompts, responses = [[10, 11, 12], [20]], [[30, 31], [40, 41, 42]]
    batch = pack(prompts, responses, pad_id=0)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = batch.input_ids[row]
        predicted = [int(ids[t + 1]) for t in torch.nonzero(batch.target_mask[row]).flatten()]
        assert predicted == r  # position t predicts token t+1: exactly the response, nothing of the prompt
        assert int(batch.attention_mask[row].sum()) == len(p) + len(r)
    assert batch.num_tokens == 5
