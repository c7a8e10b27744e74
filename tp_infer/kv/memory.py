"""KV-cache and weight memory: the per-token formula, what a loaded rank really holds, and sizing the cache from a
memory budget."""

import math
from dataclasses import replace

import torch

from tp_infer.config import ConfigError, ModelArgs
from tp_infer.kv.pool import CacheTensor
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import Transformer

CACHE_BYTES = {"bf16": 2, "fp32": 4, "fp8": 1}
SCALE_BYTES = 4  # one fp32 scale per cached row in FP8 mode


def kv_bytes_per_token(args: ModelArgs, world_size: int) -> int:
    """Cache bytes one token of conversation takes on each rank, over all layers. absorb caches the latent and the
    rope key, the same on every rank; naive caches each local head's key and value."""
    dtype = args.dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    elem = CACHE_BYTES[dtype]
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
        model = Transformer(replace(args, max_batch_size=1, max_seq_len=1), tp)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measured_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) a loaded rank really holds."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = sum(m.nbytes for m in model.modules() if isinstance(m, CacheTensor))
    return weights, cache


def parse_budget(text: str) -> tuple[float, bool]:
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
        raise ConfigError(f"--kv-cache-memory {text!r}: give gigabytes (e.g. 12 or 12GB) or a share like 90%") from None


def size_cache(args: ModelArgs, tp: TensorParallel, budget: str, device: torch.device) -> tuple[ModelArgs, str]:
    """Choose max_batch_size (and, if not even one slot fits, a shorter max_seq_len) so that the KV cache fits the
    budget on each rank. Returns the new args and a sentence saying what was chosen."""
    amount, is_share = parse_budget(budget)
    if is_share:
        if device.type != "cuda":
            raise ConfigError(f"--kv-cache-memory {budget}: a share of free memory needs CUDA; give gigabytes")
        free, _ = torch.cuda.mem_get_info(device)
        amount = (free - weight_bytes(args, tp)) * amount
    per_token = kv_bytes_per_token(args, tp.world_size)
    tokens = int(amount // per_token)
    if tokens < 1:
        raise ConfigError(f"--kv-cache-memory {budget}: not enough for one token ({per_token} bytes per token)")
    seq_len = min(args.max_seq_len, tokens)
    slots = tokens // seq_len
    sized = replace(args, max_batch_size=slots, max_seq_len=seq_len)
    note = (
        f"KV cache sized from {budget}: {slots} slots x {seq_len} tokens at {per_token} bytes/token "
        f"= {slots * seq_len * per_token / 1e9:.3f} GB per rank"
    )
    return sized, note


def describe(rank: int, weights: int, cache: int, args: ModelArgs, world_size: int) -> str:
    per_token = kv_bytes_per_token(args, world_size)
    tokens = args.max_batch_size * args.max_seq_len
    return (
        f"rank {rank}: weights {weights / 1e9:.3f} GB, KV cache {cache / 1e9:.3f} GB "
        f"({per_token} B/token x {args.max_batch_size} slots x {args.max_seq_len} = {tokens} tokens)"
    )
