"""KV-pool and weight memory: the per-token formula, what a loaded rank really holds, and sizing the pool from a
memory budget."""

import math

import torch

from tp_infer.config import ConfigError, ModelArgs
from tp_infer.kv.pool import CACHE_DTYPES, KVPool
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import Transformer

SCALE_BYTES = 4  # one fp32 scale per cached row in FP8 mode


def kv_bytes_per_token(args: ModelArgs, world_size: int) -> int:
    """Cache bytes one token of conversation takes on each rank, over all layers. absorb caches the latent and the
    rope key, the same on every rank; naive caches each local head's key and value."""
    dtype = args.dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    elem = CACHE_DTYPES[dtype].itemsize
    if args.attn_impl == "absorb":
        values, rows = args.kv_lora_rank + args.qk_rope_head_dim, 2
    else:
        heads = args.n_heads // world_size
        values, rows = heads * (args.qk_head_dim + args.v_head_dim), 2 * heads
    per_layer = values * elem + (rows * SCALE_BYTES if dtype == "fp8" else 0)
    return per_layer * args.n_layers


def weight_bytes(args: ModelArgs, tp: TensorParallel) -> int:
    """Bytes of one rank's weights, counted on a model built on `meta` (nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(args, tp)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measured_bytes(model: torch.nn.Module, pool: KVPool) -> tuple[int, int]:
    """(weight bytes, KV-pool bytes) a loaded rank really holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters()), pool.nbytes


def parse_budget(text: str, option: str = "--kv-cache-memory") -> tuple[float, bool]:
    """'12' or '12GB' -> (12e9 bytes, False); '90%' -> (0.9, True): a share of free device memory."""
    value = text.strip().upper().removesuffix("GB").removesuffix("G")
    try:
        if value.endswith("%"):
            share = float(value[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return share, True
        gigabytes = float(value)
        if gigabytes <= 0 or not math.isfinite(gigabytes):
            raise ValueError
        return gigabytes * 1e9, False
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give gigabytes (e.g. 12 or 12GB) or a share like 90%") from None


def size_pool(
    args: ModelArgs, tp: TensorParallel, budget: str | None, block_size: int, device: torch.device
) -> tuple[int, str]:
    """The number of pool blocks that fit the budget on each rank (default: max_batch_size x max_seq_len tokens, the
    memory one slot per running turn would take). Returns the blocks and a sentence saying what was chosen."""
    per_token = kv_bytes_per_token(args, tp.world_size)
    if budget is None:
        tokens, source = args.max_batch_size * args.max_seq_len, f"{args.max_batch_size} x max_seq_len"
    else:
        amount, is_share = parse_budget(budget)
        if is_share:
            if device.type != "cuda":
                raise ConfigError(f"--kv-cache-memory {budget}: a share of free memory needs CUDA; give gigabytes")
            free, _ = torch.cuda.mem_get_info(device)
            amount = (free - weight_bytes(args, tp)) * amount
        tokens, source = int(amount // per_token), budget
    blocks = tokens // block_size
    if blocks < 1:
        raise ConfigError(
            f"--kv-cache-memory {budget}: not enough for one block of {block_size} tokens ({per_token} bytes per token)"
        )
    note = (
        f"KV pool sized from {source}: {blocks} blocks x {block_size} tokens at {per_token} bytes/token "
        f"= {blocks * block_size} tokens, {blocks * block_size * per_token / 1e9:.3f} GB per rank"
    )
    return blocks, note


def describe(rank: int, weights: int, cache: int, pool: KVPool) -> str:
    tokens = pool.num_blocks * pool.block_size
    return (
        f"rank {rank}: weights {weights / 1e9:.3f} GB, KV pool {cache / 1e9:.3f} GB "
        f"({pool.num_blocks} blocks x {pool.block_size} = {tokens} tokens)"
    )


def gigabytes(text: str, option: str) -> float:
    """Bytes of a budget given in gigabytes (a share of device memory makes no sense for host memory or disk)."""
    amount, is_share = parse_budget(text, option)
    if is_share:
        raise ConfigError(f"{option} {text}: give gigabytes, not a share")
    return amount


def size_tiers(
    args: ModelArgs,
    world_size: int,
    block_size: int,
    pool_blocks: int,
    host_memory: str | None,
    disk_path: str | None,
    disk_size: str,
) -> tuple[int, int, str]:
    """Blocks of the host tier (per rank) and of the disk tier (in all), and a sentence saying so. With a disk tier
    the host tier is needed (blocks read from disk pass through it): by default it then holds as many blocks as the
    pool. On disk, absorb mode keeps one file per block for all ranks, naive mode one per rank."""
    per_block = kv_bytes_per_token(args, world_size) * block_size
    host_blocks = 0
    if host_memory is not None:
        host_blocks = int(gigabytes(host_memory, "--kv-host-memory") // per_block)
        if host_blocks < 1:
            raise ConfigError(f"--kv-host-memory {host_memory}: not enough for one block ({per_block} bytes)")
    elif disk_path is not None:
        host_blocks = pool_blocks
    disk_blocks, notes = 0, []
    if host_blocks:
        notes.append(f"host tier {host_blocks} blocks, {host_blocks * per_block / 1e9:.3f} GB per rank")
    if disk_path is not None:
        amount = gigabytes(disk_size, "--kv-disk-size")
        files_per_block = 1 if args.attn_impl == "absorb" else world_size
        disk_blocks = int(amount // (per_block * files_per_block))
        if disk_blocks < 1:
            raise ConfigError(f"--kv-disk-size {disk_size}: not enough for one block ({per_block} bytes a file)")
        notes.append(
            f"disk tier {disk_path}: up to {disk_blocks} blocks, {files_per_block} file(s) of {per_block} bytes each"
        )
    return host_blocks, disk_blocks, "; ".join(notes)
