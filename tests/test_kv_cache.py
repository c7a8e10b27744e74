"""The KV cache: its measured size equals the formula, FP8 storage stays close to full precision, and reuse with
an FP8 cache still computes only the new tokens."""

import engine_drivers as drv
import pytest
import rank_fns
import torch
from harness import device_for, run_ranks
from test_engine import EIGHT_TURNS

from tp_infer.config import load_config
from tp_infer.distributed import DistContext
from tp_infer.kv.layout import CacheLayout, CacheQuantity
from tp_infer.kv.memory import parse_budget, size_pool
from tp_infer.kv.pool import KVPool
from tp_infer.model.attention import cache_layout


@pytest.mark.parametrize("world_size", [1, 2])
def test_measured_cache_bytes_equal_the_formula(converted, world_size):
    for per_rank in run_ranks(world_size, rank_fns.cache_bytes, str(converted["v3"])):
        assert len(per_rank) == 6
        for combination, (measured, formula) in per_rank.items():
            assert measured == formula, combination


def test_formula_on_the_published_671B_config():
    args = load_config("configs/config_671B.json", attn_impl="absorb", dtype="bf16")
    assert (
        cache_layout(args, 8).bytes_per_token == 61 * (512 + 64) * 2
    )  # the latent and the rope key, the same on every rank
    fp8 = load_config("configs/config_671B.json", attn_impl="absorb", kv_cache_dtype="fp8")
    assert cache_layout(fp8, 8).bytes_per_token == 61 * (512 + 64 + 2 * 4)  # e4m3 values plus one fp32 scale per row
    naive = load_config("configs/config_671B.json", attn_impl="naive", dtype="bf16")
    assert cache_layout(naive, 8).bytes_per_token == 61 * 16 * (192 + 128) * 2  # 16 local heads' keys and values


def logits(ckpt, **options) -> torch.Tensor:
    runner = rank_fns.load(DistContext(0, 1, torch.device(device_for(1))), ckpt, slots=1, max_seq_len=64, **options)
    return rank_fns.forward(runner, [(0, 0, rank_fns.PROMPT)], all_logits=True)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_fp8_cache_logits_stay_close(converted, impl):
    """e4m3 keeps 3 mantissa bits: each cached value is off by up to 1/16 of its magnitude (about 2.5% rms). On
    this deliberately sensitive random model that shows as about 10% of the logits' norm; we allow 20%."""
    full = logits(converted["v3"], attn_impl=impl)
    fp8 = logits(converted["v3"], attn_impl=impl, kv_cache_dtype="fp8")
    relative = ((fp8 - full).norm() / full.norm()).item()
    print(f"{impl}: fp8 cache relative logit error {relative:.3f}, max abs {(fp8 - full).abs().max():.3f}")
    assert 0 < relative < 0.2


def test_fp8_cache_reuse_computes_only_new_tokens(converted):
    options = {"max_seq_len": 256, "max_batch_size": 2, "kv_cache_dtype": "fp8"}
    out = run_ranks(2, rank_fns.serve, str(converted["v3"]), options, drv.reuse_and_recompute, EIGHT_TURNS)[0]
    assert [t["computed"] for t in out["reuse"]] == [len(t) for t in EIGHT_TURNS]
    agree = sum(
        a == b
        for r, f in zip(out["reuse"], out["recompute"], strict=True)
        for a, b in zip(r["generated"], f["generated"], strict=False)
    )
    total = sum(len(t["generated"]) for t in out["reuse"])
    assert agree / total > 0.8


def test_pool_sized_from_memory():
    args = load_config("configs/config_tiny.json", dtype="fp32", max_seq_len=512, max_batch_size=3)
    layout = cache_layout(args, 2)
    per_token = layout.bytes_per_token
    blocks, note = size_pool(args, layout, f"{per_token * 16 * 40 / 1e9}GB", 16, torch.device("cpu"))
    assert blocks == 40 and "40 blocks x 16 tokens" in note
    default, note = size_pool(args, layout, None, 16, torch.device("cpu"))
    assert default == 3 * 512 // 16 and "3 x max_seq_len" in note
    with pytest.raises(ValueError, match="not enough for one block"):
        size_pool(args, layout, f"{per_token * 15 / 1e9}", 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CUDA"):
        size_pool(args, layout, "90%", 16, torch.device("cpu"))
    for bad in ("-1", "abc", "0", "150%"):
        with pytest.raises(ValueError, match="--kv-cache-memory"):
            parse_budget(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_a_quantity_kept_per_group_of_tokens(dtype):
    """A layout may keep a quantity once per group of consecutive tokens (a compressed attention's, as DeepSeek-V4
    keeps one entry per 4 or 128 tokens): the pool gives it block_size / g rows a block, a token's slot maps to its
    group's row, reads, block copies and copies to another tier carry it, its bytes count once per group, and a block
    size that splits a group is refused."""
    quantities = (
        CacheQuantity(name="latent", shape=(8,)),
        CacheQuantity(name="groups", shape=(8,), tokens_per_entry=4),
    )
    layout = CacheLayout(layers=2, quantities=quantities, dtype=dtype, replicated=True)
    scale = 4 if dtype == torch.float8_e4m3fn else 0
    assert layout.bytes_per_token == 2 * ((8 * dtype.itemsize + scale) + (8 * dtype.itemsize + scale) / 4)
    pool = KVPool.of(layout, 3, 16, torch.device("cpu"))
    grouped = pool.layers[1].tensors[1]
    assert tuple(grouped.data.shape) == (3, 4, 8) and pool.layout()["1.1"][0] == (4, 8)
    slots = torch.tensor([2 * 16 + 5, 0 * 16 + 15])  # block 2's group 1, block 0's group 3
    assert grouped.entry_slots(slots).tolist() == [2 * 4 + 1, 0 * 4 + 3]
    values = torch.tensor([[1.0] * 8, [-2.0] * 8])
    grouped.write(grouped.entry_slots(slots), values)
    read = grouped.read(torch.tensor([[2, 0]]), torch.float32)
    assert read.shape == (1, 8, 8)
    assert torch.equal(read[0, 1], values[0]) and torch.equal(read[0, 7], values[1])
    pool.copy(torch.tensor([2]), torch.tensor([1]))
    assert torch.equal(grouped.read(torch.tensor([[1]]), torch.float32)[0, 1], values[0])
    host = KVPool.of(layout, 2, 16, torch.device("cpu"))
    pool.copy_to(host, [0], [1])
    assert torch.equal(host.layers[1].tensors[1].read(torch.tensor([[1]]), torch.float32)[0, 3], values[1])
    with pytest.raises(ValueError, match="multiple of it"):
        KVPool.of(layout, 3, 6, torch.device("cpu"))
