"""Token choice: greedy, temperature, top-k, top-p, seeds, stop rules, and refused parameters."""

import pytest
import torch

from tp_infer.engine.sampling import SamplingParams, sample

LOGITS = torch.tensor([0.5, 3.0, 2.9, -1.0, 1.0])


def draws(params: SamplingParams, n: int = 400, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample(LOGITS, params, generator) for _ in range(n)]


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams()) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert set(draws(SamplingParams(temperature=1.0, top_k=1))) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01))) == {1}


def test_top_k_keeps_only_the_k_best():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2))) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(0)  # token 1: 0.46, token 2: 0.42, token 4: 0.06 ...
    assert probs[1] + probs[2] > 0.8
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8))) == {1, 2}


def test_temperature_follows_the_distribution():
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0), n=4000)), minlength=5).float()
    assert torch.allclose(counts / counts.sum(), LOGITS.softmax(0), atol=0.03)


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0)
    assert draws(params, seed=7) == draws(params, seed=7)
    assert draws(params, seed=7) != draws(params, seed=8)


def test_stop_rules():
    params = SamplingParams(eos_token_ids=(1,), stop_token_ids=(9,))
    assert params.stops_at(1) and params.stops_at(9) and not params.stops_at(2)
    ignoring = SamplingParams(eos_token_ids=(1,), stop_token_ids=(9,), ignore_eos=True)
    assert not ignoring.stops_at(1) and ignoring.stops_at(9)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_parameters_are_refused_by_name(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)
