"""FP8 block quantisation as DeepSeek ships it: float8_e4m3fn weights with one fp32 scale per 128x128 block."""

import torch

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def scale_shape(rows: int, cols: int) -> tuple[int, int]:
    return (-(-rows // BLOCK), -(-cols // BLOCK))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight[..., i, j] * scale[..., i // 128, j // 128] in `dtype` (weight_scale_inv multiplies, despite its name),
    for one weight [N, K] or a stack of them [E, N, K] with scales [E, ceil(N / 128), ceil(K / 128)]. One copy into
    `dtype` then one multiply in place by the fp32 block scales (each product rounded once, as in fp32): no full-size
    fp32 temporary, the scales broadcast over their blocks."""
    *lead, rows, cols = weight.shape
    out = weight.to(dtype)
    if rows % BLOCK == 0 and cols % BLOCK == 0:  # whole blocks (DeepSeek's shapes but wkv_a's): one broadcast multiply
        blocks = out.view(*lead, rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
        blocks.mul_(scale.float().view(*lead, rows // BLOCK, 1, cols // BLOCK, 1))
        return out
    scale = scale.float().repeat_interleave(BLOCK, -2)[..., :rows, :]  # [..., N, ceil(K / 128)]: 1/128 of the size
    whole = cols - cols % BLOCK
    if whole:
        out[..., :whole].view(*lead, rows, whole // BLOCK, BLOCK).mul_(scale[..., : whole // BLOCK, None])
    if whole < cols:
        out[..., whole:].mul_(scale[..., -1:])
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation to e4m3; returns (fp8 weight, fp32 scale) with dequantize() as inverse."""
    rows, cols = weight.shape
    srows, scols = scale_shape(rows, cols)
    padded = torch.zeros(srows * BLOCK, scols * BLOCK, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(srows, BLOCK, scols, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(srows * BLOCK, scols * BLOCK)[:rows, :cols].contiguous(), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] (K a multiple of 128) quantised per 1x128 block, as DeepSeek's recipe does before an FP8
    product: (e4m3 values [M, K], fp32 scales [M, K / 128])."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    scale = blocks.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (blocks / scale[..., None]).to(torch.float8_e4m3fn).flatten(-2), scale
