"""The model gives the same logits at every world size, in naive and absorb form, however a sequence is fed."""

from pathlib import Path

import pytest
import rank_fns
import torch
from harness import run_ranks

from tp_infer.config import load_config
from tp_infer.model.attention import MLA
from tp_infer.model.layers import TensorParallel

CONFIG_671B = Path(__file__).resolve().parent.parent / "configs" / "config_671B.json"

TOL = 1e-5


@pytest.fixture(scope="module")
def suites(converted):
    """suites[kind][world_size] = rank 0's logits_suite; every rank's logits are checked to agree."""
    out = {}
    for kind, ckpt in converted.items():
        out[kind] = {}
        for world_size in (1, 2, 4):
            results = run_ranks(world_size, rank_fns.logits_suite, str(ckpt))
            for other in results[1:]:
                for impl in other:
                    for key in other[impl]:
                        assert torch.equal(other[impl][key], results[0][impl][key]), (kind, world_size, impl, key)
            out[kind][world_size] = results[0]
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


IMPLS = ["naive", "absorb", "absorb_expanded"]


@pytest.mark.parametrize("kind", ["v3", "v2", "v32"])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_world_sizes_agree(suites, kind, world_size, impl):
    """Prefill, multi-token forwards at start_pos > 0, decode and ragged batches match world size 1."""
    base, other = suites[kind][1][impl], suites[kind][world_size][impl]
    for key in base:
        assert max_diff(base[key], other[key]) <= TOL, key


@pytest.mark.parametrize("kind", ["v3", "v2", "v32"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["absorb", "absorb_expanded"])
def test_naive_and_absorb_agree(suites, kind, world_size, impl):
    naive, absorb = suites[kind][world_size]["naive"], suites[kind][world_size][impl]
    for key in naive:
        assert max_diff(naive[key], absorb[key]) <= TOL, key


def test_absorb_expands_the_latent_for_long_prefills_only():
    """At V3's shapes the FLOP count expands the latent for long new rows over a long history, never for decode."""
    with torch.device("meta"):
        mla = MLA(load_config(CONFIG_671B, max_seq_len=4096, max_batch_size=1), TensorParallel(0, 1), torch.bfloat16)
    assert not mla.expanding_is_cheaper(1, 4096)
    assert not mla.expanding_is_cheaper(64, 4096)
    assert mla.expanding_is_cheaper(512, 4096)
    assert mla.expanding_is_cheaper(2048, 2048)


@pytest.mark.parametrize("kind", ["v3", "v2", "v32"])
@pytest.mark.parametrize("impl", IMPLS)
def test_whole_chunked_and_token_by_token_agree(suites, kind, impl):
    s = suites[kind][2][impl]
    assert max_diff(s["whole"], s["chunks"]) <= TOL
    assert max_diff(s["whole"], s["single"]) <= TOL
    # ragged rows: slot 3 continues the prompt at position 10, slot 1 decodes at position len(prompt)
    assert max_diff(s["ragged"][0], s["whole"][15]) <= TOL
    assert max_diff(s["ragged"][1], s["decode"][1]) <= TOL


@pytest.fixture(scope="module")
def long_suites(converted):
    """long[world_size] = rank 0's long_prefill_suite on the v3 checkpoint; every rank's logits agree."""
    out = {}
    for world_size in (1, 2):
        results = run_ranks(world_size, rank_fns.long_prefill_suite, str(converted["v3"]))
        for other in results[1:]:
            for impl in other:
                assert torch.equal(other[impl]["whole"], results[0][impl]["whole"]), (world_size, impl)
        out[world_size] = results[0]
    return out


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_wide_rows_agree_however_fed_and_wherever_cached(long_suites, world_size, impl):
    """200 tokens in one causal row over consecutive blocks (read in place), in chunks of 40 + 160 (a wide masked
    row over a history) and over scattered blocks (gathered) give the same logits, at world size 1 and 2."""
    s = long_suites[world_size][impl]
    assert s["first_blocks"] == [None]  # the scattered table is gathered, not read in place
    assert max_diff(s["whole"], s["chunks"]) <= TOL
    assert max_diff(s["whole"], s["scattered"]) <= TOL
    assert max_diff(s["whole"], long_suites[1][impl]["whole"]) <= TOL
    assert max_diff(s["whole"], long_suites[world_size]["naive"]["whole"]) <= TOL


def test_logits_are_not_degenerate(suites):
    """Guard against a vacuous pass: the logits spread over several units and depend on the tokens."""
    whole = suites["v3"][1]["absorb"]["whole"]
    assert whole.std() > 0.3
    assert max_diff(whole[3], whole[4]) > 0.3
