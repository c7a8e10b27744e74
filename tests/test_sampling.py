"""Token choice: greedy, temperature, top-k, top-p, seeds, stop rules, and refused parameters."""

import pytest
import torch

from tp_infer.engine.sampling import SamplingParams, check_seed, sample

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
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output"),
        ({"stop_token_ids": [1, -3]}, "stop_token_ids"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
    ],
)
def test_bad_parameters_are_refused_by_name(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


# ---- issue 28: values that once made the sampler raise ("invalid multinomial distribution", inf/nan) -------------
def random_logits(seed: int, n: int = 1000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("top_p", [1e-50, 7e-46, 5e-324])
def test_a_nucleus_too_small_for_any_token_keeps_the_likeliest(top_p):
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        logits = random_logits(seed)
        assert sample(logits, SamplingParams(temperature=1.0, top_p=top_p), generator) == int(logits.argmax())


@pytest.mark.parametrize("temperature", [1e-39, 1e-300, 5e-324])
def test_a_temperature_whose_logits_overflow_samples_as_greedy(temperature):
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        logits = random_logits(seed)
        for params in (
            SamplingParams(temperature=temperature),
            SamplingParams(temperature=temperature, top_p=0.5, top_k=10),
        ):
            assert sample(logits, params, generator) == int(logits.argmax())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_finite_values_give_a_valid_token(dtype):
    """Extreme logits, temperatures and nuclei in every dtype the model may hand over: always an id in range."""
    generator = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    rows = [random_logits(1).to(dtype), torch.tensor([big, -big, 0.0, big], dtype=dtype), torch.zeros(7, dtype=dtype)]
    for logits in rows:
        for temperature in (5e-324, 1e-30, 0.7, 1e30, 1.7e308):
            for top_p in (5e-324, 0.3, 1.0):
                for top_k in (0, 1, 3):
                    token = sample(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k), generator)
                    assert 0 <= token < logits.numel()


def test_nan_and_infinite_logits_do_not_raise():
    generator = torch.Generator().manual_seed(0)
    nan = float("nan")
    assert sample(torch.tensor([nan, 2.0, nan]), SamplingParams(temperature=1.0), generator) == 1
    assert sample(torch.tensor([nan, nan]), SamplingParams(temperature=1.0), generator) in (0, 1)
    assert sample(torch.tensor([0.0, float("inf"), 1.0]), SamplingParams(temperature=1.0), generator) == 1
    masked = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0])
    assert set(sample(masked, SamplingParams(temperature=1.0), generator) for _ in range(50)) == {1, 3}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": None}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 1.0}, "max_new_tokens"),
    ],
)
def test_values_the_sampler_cannot_compute_are_refused_by_name(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_tiny_positive_values_are_accepted():
    SamplingParams(temperature=5e-324, top_p=5e-324)
    SamplingParams(temperature=1e-300, top_p=1e-50)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70, 1.5, "1", True, None])
def test_seeds_the_generator_cannot_take_are_refused_by_name(seed):
    with pytest.raises(ValueError, match="seed"):
        check_seed(seed)


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63), 12345])
def test_seeds_the_generator_takes_pass(seed):
    assert check_seed(seed) == seed
    torch.Generator().manual_seed(seed)


# ---- issue 31: vLLM's and SGLang's fields -------------------------------------------------------------------------
def test_top_k_minus_one_is_no_cut():
    assert SamplingParams(top_k=-1).top_k == 0


def test_min_p_keeps_tokens_at_least_min_p_times_the_likeliest():
    """LOGITS at temperature 1: token 1 weighs 1, token 2 e^-0.1 = 0.905, token 4 e^-2 = 0.135, token 0 e^-2.5 =
    0.082, token 3 e^-4 = 0.018 (relative to the likeliest)."""
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.1), n=2000)) == {1, 2, 4}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.5), n=2000)) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.91), n=500)) == {1}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.01), n=4000)) == {0, 1, 2, 3, 4}


def test_top_k_and_min_p_never_sample_outside_their_set_over_a_large_vocabulary():
    generator = torch.Generator().manual_seed(3)
    logits = random_logits(11, n=5000)
    allowed_k = set(logits.topk(20).indices.tolist())
    probs = logits.double().softmax(0)
    allowed_p = set((probs >= 0.02 * probs.max()).nonzero().flatten().tolist())
    for _ in range(300):
        assert sample(logits, SamplingParams(temperature=1.5, top_k=20), generator) in allowed_k
        assert sample(logits, SamplingParams(temperature=1.0, min_p=0.02), generator) in allowed_p


def test_repetition_penalty_as_a_hand_computation():
    """Logits [2.0, 1.5, -0.5, 1.9] with token 0 and 2 seen, penalty 2: [1.0, 1.5, -1.0, 1.9]: greedy picks 3,
    where without the penalty it picks 0; token 2 (negative) becomes less likely, not more."""
    logits = torch.tensor([2.0, 1.5, -0.5, 1.9])
    assert sample(logits, SamplingParams()) == 0
    assert sample(logits, SamplingParams(repetition_penalty=2.0), tokens=[0, 2, 0]) == 3
    assert sample(logits, SamplingParams(repetition_penalty=2.0), tokens=[3, 0]) == 1  # [1.0, 1.5, -0.5, 0.95]
    assert sample(logits, SamplingParams(repetition_penalty=2.0)) == 0  # nothing seen: nothing penalised
    # sampled: the distribution is softmax of the penalised logits
    penalised = torch.tensor([1.0, 1.5, -1.0, 1.9])
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    got = torch.bincount(torch.tensor([sample(logits, params, generator, [0, 2]) for _ in range(4000)]), minlength=4)
    assert torch.allclose(got.double() / 4000, penalised.double().softmax(0), atol=0.03)
    # a penalty below 1 favours what was seen
    assert sample(logits, SamplingParams(repetition_penalty=0.5), tokens=[1]) == 1  # 1.5 / 0.5 = 3.0
    # ids outside the vocabulary are ignored
    assert sample(logits, SamplingParams(repetition_penalty=2.0), tokens=[99, -1]) == 0


def test_min_tokens_holds_back_the_stop_tokens():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0])  # 1 is eos, 3 a stop token
    params = SamplingParams(eos_token_ids=(1,), stop_token_ids=(3,), min_tokens=2)
    assert [sample(logits, params, generated=g) for g in range(4)] == [2, 2, 1, 1]
    assert not params.stops_at(1, 1) and params.stops_at(1, 2) and params.stops_at(3, 5)
    assert params.held_back(0) == (3, 1) and params.held_back(2) == ()
    ignoring = SamplingParams(eos_token_ids=(1,), stop_token_ids=(3,), min_tokens=2, ignore_eos=True)
    assert ignoring.held_back(0) == (3,)
    generator = torch.Generator().manual_seed(0)
    hot = SamplingParams(temperature=1.0, eos_token_ids=(1,), stop_token_ids=(3,), min_tokens=5)
    assert {sample(logits, hot, generator, generated=4) for _ in range(300)} <= {0, 2}
    # every token held back: still a token, no error
    assert sample(torch.tensor([1.0, 2.0]), SamplingParams(eos_token_ids=(0, 1), min_tokens=1)) in (0, 1)
    assert sample(torch.tensor([1.0, 2.0]), SamplingParams(temperature=1.0, eos_token_ids=(0, 1), min_tokens=1)) in (
        0,
        1,
    )


def test_shows_hides_only_the_stop_token_unless_asked():
    params = SamplingParams(eos_token_ids=(1,), stop_token_ids=(9,))
    assert not params.shows(1, 3) and not params.shows(9, 0) and params.shows(5, 0)
    assert SamplingParams(eos_token_ids=(1,), include_stop_str_in_output=True).shows(1, 3)
    assert SamplingParams(eos_token_ids=(1,), ignore_eos=True).shows(1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_new_fields_never_raise_on_finite_input(dtype):
    generator = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    rows = [random_logits(2).to(dtype), torch.tensor([big, -big, 0.0, big], dtype=dtype), torch.zeros(7, dtype=dtype)]
    for logits in rows:
        for temperature in (0.0, 5e-324, 0.7, 1.7e308):
            for min_p in (0.0, 5e-324, 0.5, 1.0):
                for penalty in (5e-324, 0.5, 1.0, 1.7e308):
                    params = SamplingParams(
                        temperature=temperature,
                        min_p=min_p,
                        repetition_penalty=penalty,
                        top_k=2,
                        eos_token_ids=(0, 1),
                        min_tokens=1,
                    )
                    token = sample(logits, params, generator, tokens=[0, 2, 3, 10**6], generated=0)
                    assert 0 <= token < logits.numel()
