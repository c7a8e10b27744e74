"""DeepSeek-V3.2's sparse attention against transformers' DeepseekV32 on the same weights: its lightning indexer
keeps INDEX_TOPK positions per query, so from the ninth token on every query attends to a chosen subset. Prompts
shorter and much longer than that, both MLA forms, world sizes 1, 2 and 4; the indexer keys cached with the blocks,
so multi-turn reuse equals recomputation."""

import re

import engine_drivers as drv
import pytest
import rank_fns
import safetensors.torch
import test_tiers as tiers
import torch
from checkpoints import INDEX_TOPK, INDEXER, hf_model, scale_weights
from fp8_fixtures import make_fp8_checkpoint, tiny_config
from harness import run_ranks
from test_backends import run_steps, tiny
from test_console import console
from test_convert import ALIGNED, read_folder
from test_engine import EIGHT_TURNS, token_lists

from tp_infer.backends import reference
from tp_infer.backends.cpu import CpuBackend
from tp_infer.config import load_config
from tp_infer.convert import convert
from tp_infer.engine.runner import StepPlan, build_batch
from tp_infer.kv.pool import KVPool
from tp_infer.model import fp8, kernels
from tp_infer.model.attention import cache_layout

TOL = 1e-4
NEW_TOKENS = 24
SHORT = rank_fns.PROMPT[:6]  # fewer positions than the indexer keeps: dense attention, still through the indexer
PROMPTS = {"short": SHORT, "long": rank_fns.PROMPT}
ROBIN = (drv.round_robin, 6, tiers.ROUNDS)


@pytest.fixture(scope="module")
def reference_runs():
    """transformers' prefill logits and greedy continuation of each prompt."""
    model = hf_model("v32")
    model.generation_config.eos_token_id = None
    out = {}
    with torch.no_grad():
        for name, prompt in PROMPTS.items():
            ids = torch.tensor([prompt])
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out[name] = (model(ids).logits[0], generated[0, len(prompt) :].tolist())
    return out


@pytest.mark.parametrize("prompt", ["short", "long"])
@pytest.mark.parametrize(
    ("world_size", "impl"), [(1, "naive"), (1, "absorb"), (2, "naive"), (2, "absorb"), (4, "absorb")]
)
def test_matches_transformers(reference_runs, converted, prompt, world_size, impl):
    """Prefill logits within TOL and the greedy continuation token for token: decode runs the history from 7 to 54
    positions, past the indexer's 8 from the first step on for the long prompt."""
    ref_logits, ref_tokens = reference_runs[prompt]
    ckpt = str(converted["v32"])
    prefill, tokens = run_ranks(world_size, rank_fns.greedy, ckpt, PROMPTS[prompt], NEW_TOKENS, impl)[0]
    diff = (prefill - ref_logits).abs().max().item()
    print(f"v32 {prompt} ws={world_size} {impl}: max |logits - transformers| = {diff:.2e}")
    assert diff <= TOL
    assert tokens == ref_tokens
    assert len(set(tokens)) > 3, "a degenerate continuation would prove little"


@pytest.mark.parametrize(("world_size", "impl"), [(1, "absorb"), (2, "naive")])
def test_long_prefill_matches_transformers(converted, world_size, impl):
    """200 tokens in one prefill, each query choosing 8 of up to 200 positions."""
    with torch.no_grad():
        ref = hf_model("v32")(torch.tensor([rank_fns.LONG_PROMPT])).logits[0]
    ckpt = str(converted["v32"])
    prefill, _ = run_ranks(world_size, rank_fns.greedy, ckpt, rank_fns.LONG_PROMPT, 0, impl, "fp32", 256)[0]
    diff = (prefill - ref).abs().max().item()
    print(f"v32 200 tokens ws={world_size} {impl}: max |logits - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_the_selection_matters():
    """The same weights attending densely (index_topk past the prompt) give other logits: the tests above would
    fail on a model that ignored the indexer."""
    sparse = hf_model("v32")
    dense = hf_model("v32")
    for layer in dense.model.layers:
        layer.self_attn.indexer.index_topk = 10_000
    ids = torch.tensor([rank_fns.LONG_PROMPT[:64]])
    with torch.no_grad():
        gap = (sparse(ids).logits - dense(ids).logits).abs().max().item()
    assert gap > 0.5, gap


@pytest.mark.parametrize(
    ("options", "bound"), [(dict(dtype="bf16"), 0.1), (dict(kv_cache_dtype="fp8"), 0.4)], ids=["bf16", "fp8-cache"]
)
def test_lower_precision_stays_close(reference_runs, converted, options, bound):
    """bf16 compute, or an FP8 cache (the indexer keys quantised with the latents), against transformers in fp32.
    bf16 is off by about 6% of the logits' norm; e4m3's 3 mantissa bits, about 10% on V3 (test_kv_cache), come to
    about 24% here, as the indexer's choices near the cut flip with its keys' rounding: most positions still
    predict the same next token. The exact token-for-token checks are fp32's."""
    ref_logits, _ = reference_runs["long"]
    prefill, _ = run_ranks(1, rank_fns.greedy_with, str(converted["v32"]), rank_fns.PROMPT, 0, options)[0]
    relative = ((prefill.float() - ref_logits).norm() / ref_logits.norm()).item()
    same = (prefill.float().argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"v32 {options}: relative logit error {relative:.3f}, same next token at {same:.0%} of positions")
    assert 0 < relative < bound
    assert same >= 0.75


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_reuse_equals_recompute_past_the_selection(converted, world_size, impl):
    """Eight turns (116 tokens of history at the end, 14x what the indexer keeps): each turn computes only its new
    tokens, its queries choosing among cached indexer keys, and replies as re-prefilling everything does."""
    options = {"max_seq_len": 256, "max_batch_size": 2, "attn_impl": impl}
    out = run_ranks(world_size, rank_fns.serve, str(converted["v32"]), options, drv.reuse_and_recompute, EIGHT_TURNS)
    reuse, recompute = out[0]["reuse"], out[0]["recompute"]
    assert [t["generated"] for t in reuse] == [t["generated"] for t in recompute]
    assert [t["computed"] for t in reuse] == [len(t) for t in EIGHT_TURNS]
    assert reuse[-1]["prompt"] > 10 * INDEX_TOPK
    assert len({tok for t in reuse for tok in t["generated"]}) > 8


def test_reuse_equals_transformers_recomputing_the_conversation(converted):
    """The last turn of a reused conversation against transformers re-reading all of it: greedy tokens equal."""
    turns = token_lists(5, [30, 7, 11])
    out = run_ranks(1, rank_fns.serve, str(converted["v32"]), {"max_seq_len": 256}, drv.conversation, turns)[0]
    history = out[-1]["prompt_ids"]
    model = hf_model("v32")
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.tensor([history])
        generated = model.generate(ids, max_new_tokens=len(out[-1]["generated"]), do_sample=False, pad_token_id=0)
    assert out[-1]["reused"] > 0 and out[-1]["computed"] == len(turns[-1])
    assert generated[0, len(history) :].tolist() == out[-1]["generated"]


def test_a_shared_system_prompt_ending_inside_a_block(converted):
    """Conversations opening with one 40-token system prompt (ending inside a block) run together: its whole blocks
    are shared, and each reply equals the conversation's alone."""
    system = token_lists(8, [40])[0]
    own = token_lists(9, [5, 12, 3, 9])
    options = {"max_seq_len": 128, "max_batch_size": 4}
    out = run_ranks(2, rank_fns.serve, str(converted["v32"]), options, drv.shared_system_prompt, system, own)[0]
    assert [t["generated"] for t in out["shared"]] == [t["generated"] for t in out["alone"]]
    assert len({tuple(path[:2]) for path in out["paths"]}) == 1, "the system prompt's whole blocks are shared"


def test_eviction_and_preemption_keep_replies_exact(converted):
    """Six conversations advanced together through a pool a few blocks larger than one: idle ones lose their cache
    (indexer keys included) and running ones are preempted mid-generation, with the replies of a pool that holds
    them all."""
    rounds = token_lists(40, [9, 5, 12])
    small = {"max_seq_len": 96, "max_batch_size": 6, "pool_tokens": 96 + 48}
    ckpt = str(converted["v32"])
    tight = run_ranks(2, rank_fns.serve, ckpt, small, drv.interleaved_rounds, 6, rounds)[0]
    ample = run_ranks(2, rank_fns.serve, ckpt, {**small, "pool_tokens": None}, drv.interleaved_rounds, 6, rounds)[0]
    for a, b in zip(tight["turns"], ample["turns"], strict=True):
        assert [t["generated"] for t in a] == [t["generated"] for t in b]
    assert tight["evicted"] > 0 and tight["preemptions"] > 0, tight


# ---- the tiers: indexer keys move with their blocks -------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "impl"), [(1, "absorb"), (2, "naive")])
def test_host_tier_restores_blocks_with_their_indexer_keys(converted, world_size, impl):
    """Six conversations in round robin through a pool that holds one: each returning turn is restored from host
    memory, indexer keys included, computes only its new tokens and replies as a pool that holds them all."""
    base = {"max_seq_len": 64, "max_batch_size": 1, "attn_impl": impl}
    ckpt = str(converted["v32"])
    small = run_ranks(world_size, rank_fns.serve, ckpt, {**base, "pool_tokens": 64, "host_tokens": 512}, *ROBIN)[0]
    roomy = run_ranks(world_size, rank_fns.serve, ckpt, {**base, "pool_tokens": 1024}, *ROBIN)[0]
    for tiered, whole in zip(small, roomy, strict=True):
        assert [t["generated"] for t in tiered] == [t["generated"] for t in whole]
        assert [t["computed"] for t in tiered] == [len(r) for r in tiers.ROUNDS]
    assert sum(t["host"] for conv in small for t in conv[1:]) > 0


@pytest.mark.parametrize(("world_size", "cache"), [(1, "bf16"), (2, "fp8")])
def test_a_later_job_continues_from_disk_and_never_from_a_v3_jobs_files(converted, tmp_path, world_size, cache):
    """A V3 job and a V3.2 job write block files for the same prompts into one disk folder; a later V3.2 job
    continues the V3.2 conversations from disk (indexer keys read back with each block: the replies of one
    uninterrupted run, only the new tokens computed) and never reads a V3 job's file."""
    ckpt, setup = converted["v32"], ["--attn-impl", "absorb", "--kv-cache-dtype", cache]
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    whole = tiers.uninterrupted(world_size, ckpt, tmp_path, *setup)
    (tmp_path / "v3").mkdir()
    tiers.first_job(world_size, converted["v3"], tmp_path / "v3", *setup, *disk)
    first, _ = tiers.first_job(world_size, ckpt, tmp_path, *setup, *disk)
    assert len(list((tmp_path / "kv").iterdir())) == 2, "one folder per checkpoint and setup"
    second, _ = tiers.second_job(world_size, ckpt, tmp_path, first, *setup, *disk)
    history = [len(p) + 8 for p in tiers.PROMPTS]
    for i in range(3):
        assert second[i]["token_ids"] == whole[i][1]["token_ids"], f"conversation {i}"
        assert second[i]["computed_tokens"] == len(tiers.NEW[i]), f"conversation {i}"
        assert second[i]["reused_tokens"] == history[i], f"conversation {i}"
    assert sum(second[i]["disk_tokens"] for i in range(3)) == sum(history) - len(tiers.SHARED)


# ---- the front ends on a V3.2 checkpoint (its chat format rendered by DeepSeek's encoder) -------------------------


def test_console_on_a_v32_checkpoint_reuses_the_history(v32_chat_ckpt):
    """The console at world size 2 on a V3.2 checkpoint: in chat mode a later turn reuses the whole history and
    computes only its new message; switched to thinking mode with earlier reasoning kept, the next turn reuses at
    least the whole previous prompt (this random model's replies stop before </think>, and a reply cut inside its
    reasoning is written back as the encoder writes it, so its own tokens are recomputed)."""
    lines = ["Hello there", "My name is Ada", "/think keep", "The code is 4821.", "how are you today?"]
    run = console(v32_chat_ckpt, lines, world_size=2)
    assert run.returncode == 0, run.stderr[-2000:]
    stats = [tuple(map(int, m)) for m in re.findall(r"\[reused (\d+) · computed (\d+) · generated (\d+)", run.stdout)]
    assert len(stats) == 4, run.stdout
    (_, first, replied), (reused, computed, _) = stats[:2]
    assert reused == first + replied and computed < 12, stats
    assert stats[3][0] >= stats[2][0] + stats[2][1], stats


def test_batch_lines_on_a_v32_checkpoint(v32_chat_ckpt, tmp_path):
    """A batch job at world size 2: messages lines in chat and thinking mode are answered; a bad thinking option is
    an error record naming it, and the other lines are answered."""
    lines = [
        {"id": "chat", "messages": [{"role": "user", "content": "Hello there"}]},
        {
            "id": "think",
            "messages": [{"role": "user", "content": "Hello there"}],
            "chat_template_kwargs": {"thinking": True},
        },
        {"id": "bad", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"thinking": "yes"}},
        {"id": "turns", "turns": ["My name is Ada", "how are you today?"], "chat_template_kwargs": {"thinking": True}},
    ]
    records, _ = tiers.batch_job(2, v32_chat_ckpt, tmp_path, "v32", lines)
    assert "thinking must be true or false" in records["bad"]["error"]
    assert all(records[i]["turns"] for i in ("chat", "think", "turns"))
    assert records["turns"]["turns"][1]["reused_tokens"] > 0


# ---- a V3.2 FP8 folder ------------------------------------------------------------------------------------------


def test_an_fp8_folder_converts_and_matches_transformers_on_its_dequantised_weights(tmp_path):
    """A V3.2-shaped FP8 folder (the indexer's wq_b and wk in e4m3 with block scales, weights_proj in bf16; one scale
    stored in another file) converts at world sizes 1 and 2, keeping FP8, the indexer whole on every rank (as
    DeepSeek's reference keeps it); its logits are transformers' on the dequantised weights, at both world sizes."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    config = DeepseekV32Config(**{**tiny_config().to_dict(), **ALIGNED, **INDEXER, "index_head_dim": 128})
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(config)
    scale_weights(model)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="300KB")
    src = make_fp8_checkpoint(tmp_path / "bf16", tmp_path / "fp8")
    hf = read_folder(src)
    assert hf["model.layers.0.self_attn.indexer.wk.weight"].dtype == torch.float8_e4m3fn
    assert hf["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    for world_size in (1, 2):
        convert(src, tmp_path / "out", world_size)
    state = {
        name: fp8.dequantize(t, hf[name + "_scale_inv"], torch.float32) if t.dtype == torch.float8_e4m3fn else t.float()
        for name, t in hf.items()
        if not name.endswith("_scale_inv")
    }
    (tmp_path / "deq").mkdir()
    (tmp_path / "deq" / "config.json").write_bytes((tmp_path / "bf16" / "config.json").read_bytes())
    safetensors.torch.save_file(state, tmp_path / "deq" / "model.safetensors", {"format": "pt"})
    oracle = DeepseekV32ForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = oracle(torch.tensor([rank_fns.PROMPT])).logits[0]
    for world_size in (1, 2):
        shard = safetensors.torch.load_file(tmp_path / "out" / f"model{world_size - 1}-mp{world_size}.safetensors")
        assert shard["layers.0.attn.indexer.wq_b.weight"].shape == (64 * 128, 96), "whole on every rank"
        assert shard["layers.0.attn.indexer.wq_b.scale"].shape == (64, 1)
        prefill, _ = run_ranks(world_size, rank_fns.greedy, str(tmp_path / "out"), rank_fns.PROMPT, 0)[0]
        diff = (prefill - expected).abs().max().item()
        print(f"v32 FP8 ws={world_size}: max |logits - transformers on dequantised weights| = {diff:.2e}")
        assert diff <= TOL


# ---- the indexer keys in the cache layout, the pool and the backends -------------------------------------------

V32 = dict(index_topk=8, index_n_heads=4, index_head_dim=32)


def test_the_layout_declares_the_indexer_keys():
    """V3.2 caches one indexer key of index_head_dim per token per layer beside attention's quantities (FP8: one
    scale per key), the same on every rank; the pool allocates it and counts its bytes."""
    args = load_config("configs/config_v3.2.json", dtype="bf16")
    absorb, naive = cache_layout(args, 8), cache_layout(args.with_options(attn_impl="naive"), 8)
    assert [q.name for q in absorb.quantities] == ["latent", "rope_key", "index_key"]
    assert [q.name for q in naive.quantities] == ["key", "value", "index_key"]
    assert absorb.bytes_per_token == 61 * 2 * (512 + 64 + 128)
    fp8 = cache_layout(args.with_options(kv_cache_dtype="fp8"), 8)
    assert fp8.bytes_per_token == 61 * (512 + 64 + 128 + 3 * 4)
    v3 = cache_layout(load_config("configs/config_671B.json", dtype="bf16"), 8)
    assert v3.bytes_per_token == 61 * 2 * (512 + 64)
    pool = KVPool.of(cache_layout(load_config("configs/config_tiny.json", **V32), 1), 4, 16, torch.device("cpu"))
    assert [tuple(t.data.shape) for t in pool.layers[0].tensors][-1] == (4, 16, 32)


@pytest.mark.parametrize(
    "options",
    [dict(attn_impl="absorb"), dict(attn_impl="naive"), dict(attn_impl="absorb", kv_cache_dtype="fp8")],
    ids=["absorb", "naive", "absorb-fp8-cache"],
)
def test_cpu_backend_matches_the_torch_backend(monkeypatch, options):
    """Prefills of 20 and 37 tokens, decode, an extend beside a decode row, decode again, with the indexer keeping
    8: the cpu backend (decode in the compiled kernels over each row's selected entries, gathered) gives the torch
    backend's logits."""
    model = tiny(**options, **V32)
    expected = run_steps(model, reference())
    blocks = []
    for name in ("mla_decode", "mha_decode"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, **k: blocks.append(a[3].shape[1]) or _f(*a, **k))
    got = run_steps(model, CpuBackend())
    fp8_cache = options.get("kv_cache_dtype") == "fp8"  # the kernels read the compute dtype only: the reference's
    if kernels.library() is not None and not fp8_cache:
        assert blocks == [INDEX_TOPK] * 3 * model.args.n_layers, "each decode step over its rows' selected entries"
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.allclose(a, b, atol=2e-3 * b.abs().max().item(), rtol=0), f"step {step}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler here")
def test_the_compiled_indexer_picks_the_torch_backends_positions():
    """kernels.index_topk (decode rows, the indexer keys read in place through scattered blocks) against
    Indexer.select: the same positions for rows that see fewer, as many and more positions than top-k, with many
    exact ties at the cut (a third of the keys zero, so relu leaves their scores at 0)."""
    model = tiny(**V32)
    indexer = model.layers[0].attn.indexer
    generator = torch.Generator().manual_seed(3)
    pool = torch.randn(12, 16, 32, generator=generator)
    pool[torch.rand(12, 16, generator=generator) < 0.35] = 0
    table = torch.tensor([[7, 2, 11, 0, 5], [3, 9, 1, 10, 4], [6, 8, 0, 2, 11]])
    lengths = torch.tensor([5, 8, 77])
    q, weights = torch.randn(3, 4, 32, generator=generator), torch.rand(3, 4, generator=generator)
    positions, counts = kernels.index_topk(q, weights, pool, table, lengths, INDEX_TOPK)
    keys = pool.index_select(0, table.flatten()).view(3, 80, 32)
    visible = (torch.arange(80) < lengths[:, None]).unsqueeze(1)
    chosen = indexer.select(q.unsqueeze(1), weights.unsqueeze(1), keys, visible)[:, 0]
    for row in range(3):
        assert positions[row, : counts[row]].tolist() == chosen[row].nonzero().flatten().tolist(), row
    assert counts.tolist() == [5, 8, 8]


def test_equal_scores_go_to_the_earlier_position():
    """Ties at the cut are broken by position, whatever the length of the row being scored."""
    model = tiny(**V32)
    indexer = model.layers[0].attn.indexer
    keys = torch.zeros(1, 24, 32)
    keys[0, [3, 17], 0] = 1.0  # two positions score higher; the rest tie at zero
    q = torch.zeros(1, 1, 4, 32)
    q[..., 0] = 1.0
    weights = torch.ones(1, 1, 4)
    for length, expected in [(16, list(range(8))), (20, [0, 1, 2, 3, 4, 5, 6, 17]), (24, [0, 1, 2, 3, 4, 5, 6, 17])]:
        visible = torch.zeros(1, 1, 24, dtype=torch.bool)
        visible[..., :length] = True
        chosen = indexer.select(q, weights, keys, visible)[0, 0].nonzero().flatten().tolist()
        assert chosen == expected, length


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_a_sparse_decode_step_and_prefill_run_on_the_meta_device(attn_impl):
    """The torch backend's selection (scores, a sort, a scatter) reads nothing back: decode rows past the indexer's
    reach and a prefill run on `meta`, where any .item() or data-dependent shape raises (FP8 weights and cache)."""
    model = tiny("meta", attn_impl=attn_impl, dtype="bf16", fp8_weights=True, kv_cache_dtype="fp8", **V32)
    pool = KVPool.of(cache_layout(model.args, 1), 48, 16, torch.device("meta"))
    tables = [[(r * 6 + i) % 48 for i in range(6)] for r in range(4)]
    decode = StepPlan.from_rows([(tables[r], 70 + r, [5]) for r in range(4)])
    prefill = StepPlan.from_rows([(tables[0][:3], 0, list(range(2, 42)))])
    for step in (decode, prefill):
        logits = model(step.tokens.to("meta"), build_batch(step, 16, torch.device("meta")), pool.layers)
        assert logits.device.type == "meta" and logits.shape == (len(step.num_new), model.args.vocab_size)


def test_the_sparse_decode_forward_compiles_whole():
    """torch.compile(fullgraph=True) of the torch backend's decode forward, two rows past the indexer's reach (FP8
    weights and cache): the eager logits, and what eager stores (indexer keys included)."""
    torch._dynamo.reset()
    model = tiny(attn_impl="absorb", fp8_weights=True, kv_cache_dtype="fp8", **V32)
    model.use_backend(reference())
    compiled = torch.compile(lambda *step: model(*step), fullgraph=True, dynamic=False)
    tables = [[(r * 6 + i) % 48 for i in range(6)] for r in range(2)]
    pools = [KVPool.of(cache_layout(model.args, 1), 48, 16, torch.device("cpu")) for _ in range(2)]
    for pool in pools:
        for r in range(2):
            warm = StepPlan.from_rows([(tables[r][:2], 0, list(range(2 + r, 26 + 2 * r)))])
            model(warm.tokens, build_batch(warm, 16, torch.device("cpu")), pool.layers)
    step = StepPlan.from_rows([(tables[r][:2], 24 + r, [3 + r]) for r in range(2)])
    eager = model(step.tokens, build_batch(step, 16, torch.device("cpu")), pools[0].layers)
    graph = compiled(step.tokens, build_batch(step, 16, torch.device("cpu")), pools[1].layers)
    assert torch.allclose(graph, eager, atol=1e-4 * eager.abs().max().item(), rtol=0)
    for a, b in zip(pools[0].named.values(), pools[1].named.values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)
