"""KV-pool and weight memory: what a loaded rank really holds, and sizing the pool and the tiers from memory
budgets, by the model's declared cache layout (kv/layout.py)."""

import math
from collections.abc import Callable

import torch

from tp_infer.config import ConfigError, ModelArgs
from tp_infer.kv.layout import CacheLayout
from tp_infer.kv.pool import KVPool


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
    args: ModelArgs,
    layout: CacheLayout,
    budget: str | None,
    block_size: int,
    device: torch.device,
    weight_bytes: Callable[[], int] = lambda: 0,
) -> tuple[int, str]:
    """The number of pool blocks that fit the budget on each rank (default: max_batch_size x max_seq_len tokens, the
    memory one slot per running turn would take; a share of free CUDA memory takes the weights, weight_bytes(), off
    first). Returns the blocks and a sentence saying what was chosen."""
    per_token = layout.bytes_per_token
    if budget is None:
        tokens, source = args.max_batch_size * args.max_seq_len, f"{args.max_batch_size} x max_seq_len"
    else:
        amount, is_share = parse_budget(budget)
        if is_share:
            if device.type != "cuda":
                raise ConfigError(f"--kv-cache-memory {budget}: a share of free memory needs CUDA; give gigabytes")
            free, _ = torch.cuda.mem_get_info(device)
            amount = (free - weight_bytes()) * amount
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
    layout: CacheLayout,
    world_size: int,
    block_size: int,
    pool_blocks: int,
    host_memory: str | None,
    disk_path: str | None,
    disk_size: str,
) -> tuple[int, int, str]:
    """Blocks of the host tier (per rank) and of the disk tier (in all), and a sentence saying so. With a disk tier
    the host tier is needed (blocks read from disk pass through it): by default it then holds as many blocks as the
    pool. On disk, a layout the same on every rank (absorb) keeps one file per block for all ranks, others one per
    rank."""
    per_block = layout.bytes_per_token * block_size
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
        files_per_block = 1 if layout.replicated else world_size
        disk_blocks = int(amount // (per_block * files_per_block))
        if disk_blocks < 1:
            raise ConfigError(f"--kv-disk-size {disk_size}: not enough for one block ({per_block} bytes a file)")
        notes.append(
            f"disk tier {disk_path}: up to {disk_blocks} blocks, {files_per_block} file(s) of {per_block} bytes each"
        )
    return host_blocks, disk_blocks, "; ".join(notes)
