"""Our logits and greedy generations against Hugging Face transformers' own DeepSeek models on the same weights."""

import pytest
import rank_fns
import torch
from checkpoints import hf_model
from harness import run_ranks

TOL = 1e-4
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference():
    """transformers' prefill logits and 32-token greedy continuation of the prompt, per variant."""
    out = {}
    prompt = torch.tensor([rank_fns.PROMPT])
    for kind in ("v3", "v2"):
        model = hf_model(kind)
        model.generation_config.eos_token_id = None  # ours decodes a fixed 32 tokens too, eos included
        with torch.no_grad():
            logits = model(prompt).logits[0]
            generated = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        generated = generated[0, prompt.shape[1] :]
        out[kind] = (logits, generated.tolist())
    return out


@pytest.mark.parametrize("kind", ["v3", "v2"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_matches_transformers(reference, converted, kind, world_size, impl):
    ref_logits, ref_tokens = reference[kind]
    prefill, tokens = run_ranks(world_size, rank_fns.greedy, str(converted[kind]), rank_fns.PROMPT, NEW_TOKENS, impl)[0]
    diff = (prefill - ref_logits).abs().max().item()
    print(f"{kind} ws={world_size} {impl}: max |logits - transformers| = {diff:.2e}")
    assert diff <= TOL
    assert tokens == ref_tokens
    assert len(set(tokens)) > 3, "a degenerate continuation would prove little"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_long_prefill_matches_transformers(converted, world_size, impl):
    """A 200-token prefill (past attention.PAD_V_FROM: the CPU's fused kernel, causal, on zero-padded values)."""
    prompt = rank_fns.LONG_PROMPT
    with torch.no_grad():
        ref = hf_model("v3")(torch.tensor([prompt])).logits[0]
    prefill, _ = run_ranks(world_size, rank_fns.greedy, str(converted["v3"]), prompt, 0, impl, "fp32", 256)[0]
    diff = (prefill - ref).abs().max().item()
    print(f"v3 ws={world_size} {impl}, {len(prompt)} tokens: max |logits - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_yarn_is_active(converted):
    from tp_infer.config import load_config

    args = load_config(converted["v3"] / "config.json")
    assert args.yarn and args.rope_factor == 4.0 and args.original_seq_len == 64
