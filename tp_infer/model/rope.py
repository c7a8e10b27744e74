"""Rotary position embedding on interleaved pairs (x[2i], x[2i+1]), with YaRN frequency scaling."""

import math

import torch

from tp_infer.config import ModelArgs


def yarn_correction_range(args: ModelArgs) -> tuple[int, int]:
    """The rotary dimensions (low, high) between which YaRN blends interpolated and original frequencies."""

    def correction_dim(num_rotations: float) -> float:
        dim, base = args.qk_rope_head_dim, args.rope_theta
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(args.beta_fast))
    high = math.ceil(correction_dim(args.beta_slow))
    return max(low, 0), min(high, args.qk_rope_head_dim - 1)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Angular frequency of each rotary pair, [qk_rope_head_dim // 2], fp32."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:
        low, high = yarn_correction_range(args)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_rotations(args: ModelArgs) -> torch.Tensor:
    """(cos, sin) of every position's angle per pair, [max_seq_len, qk_rope_head_dim // 2, 2] fp32 (the layout of
    complex64, which torch.view_as_complex reads in place), scaled by YaRN's rope mscale."""
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1) * args.rope_mscale


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x [N, H, D] (or [N, D]) by rotations [N, D/2, 2] (cos, sin), computed in fp32: each pair
    (even, odd) becomes (even cos - odd sin, even sin + odd cos). Real arithmetic, no complex tensors: a compiled
    step fuses it."""
    if x.dim() == rotations.dim():
        rotations = rotations.unsqueeze(-3)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd, cos, sin = pairs[..., 0], pairs[..., 1], rotations[..., 0], rotations[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def apply_rope_halves(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, D] (or [N, D]) by rotations [N, D/2, 2] (cos, sin) in the half-split layout that V3.2's
    indexer uses (the main MLA rotates interleaved pairs): pair i is (x[i], x[i + D/2]), computed in fp32."""
    if x.dim() == rotations.dim():
        rotations = rotations.unsqueeze(-3)
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = rotations[..., 0], rotations[..., 1]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1).to(x.dtype)
