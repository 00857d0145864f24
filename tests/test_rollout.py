"""Packing rollouts into a batch: which positions predict response tokens."""

import torch

from tip_cli.rollout.batch import left_pad, pack, trim_at_eos


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


def test_hf_engine_logprobs_and_stop_tokens(tmp_path):
    from tip_cli.config.schema import PairConfig
    from tip_cli.models import load_model, load_tokenizer
    from tip_cli.rollout.batch import Sampling
    from tip_cli.rollout.hf import HFEngine
    from tip_cli.toy.build import build_micro_pair

    _, path = build_micro_pair(tmp_path)
    model = load_model(str(path), PairConfig(), torch.device("cpu"), trainable=False)
    engine = HFEngine(model, load_tokenizer(str(path), PairConfig()))
    prompts = [[5, 6, 7, 8], [9, 10]]
    torch.manual_seed(0)
    out = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=12, logprobs=True))
    assert len(out.tokens) == 4 and [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]
    for i, (resp, lps) in enumerate(zip(out.tokens, out.logprobs, strict=True)):
        seq = torch.tensor([prompts[i // 2] + resp])
        with torch.no_grad():
            ref = torch.log_softmax(model(seq).logits[0].double(), -1)
        want = [ref[len(prompts[i // 2]) - 1 + t, tok].item() for t, tok in enumerate(resp)]
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    # a stop token ends the response and is kept, like EOS
    first = out.tokens[0][0]
    stopped = engine.generate(prompts[:1], Sampling(temperature=0.0, max_new_tokens=12, stop_token_ids=(first,)))
    greedy = engine.generate(prompts[:1], Sampling(temperature=0.0, max_new_tokens=12)).tokens[0]
    cut = greedy.index(first) + 1 if first in greedy else len(greedy)
    assert stopped.tokens[0] == greedy[:cut]


def test_hf_rollouts_sample_the_tempered_softmax_whatever_the_generation_config(penalized_student, tempered_check):
    from tip_cli.config.schema import PairConfig
    from tip_cli.models import load_model, load_tokenizer
    from tip_cli.rollout.hf import HFEngine

    model = load_model(str(penalized_student), PairConfig(), torch.device("cpu"), trainable=False)
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint asks for it; the engine ignores it
    torch.manual_seed(0)
    tempered_check(model, HFEngine(model, load_tokenizer(str(penalized_student), PairConfig())), 0.8)


def test_hf_samples_follow_from_the_seed_whatever_the_rng_state(micro):
    from tip_cli.config.schema import PairConfig
    from tip_cli.models import load_model, load_tokenizer
    from tip_cli.rollout.batch import Sampling
    from tip_cli.rollout.hf import HFEngine

    path = str(micro["teacher"])  # a few SFT steps: varied samples (the untrained micro student repeats a token)
    engine = HFEngine(load_model(path, PairConfig(), torch.device("cpu"), trainable=False),
                      load_tokenizer(path, PairConfig()), batch_size=2)  # two calls to generate: the seed spans both
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 5]]

    def sample(seed, rng_seed):
        torch.manual_seed(rng_seed)  # whatever drew from the global RNG before
        return engine.generate(prompts, Sampling(n=1, temperature=1.0, max_new_tokens=16, seed=seed)).tokens

    first = sample(5, rng_seed=0)
    assert sample(5, rng_seed=1) == first
    assert sample(6, rng_seed=0) != first
