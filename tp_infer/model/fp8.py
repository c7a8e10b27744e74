"""FP8 block quantisation as DeepSeek ships it: float8_e4m3fn weights with one fp32 scale per 128x128 block."""

import torch

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def scale_shape(rows: int, cols: int) -> tuple[int, int]:
    return (-(-rows // BLOCK), -(-cols // BLOCK))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight[i, j] * scale[i // 128, j // 128], in `dtype` (weight_scale_inv multiplies, despite its name)."""
    rows, cols = weight.shape
    full = scale.float().repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (weight.float() * full).to(dtype)


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
