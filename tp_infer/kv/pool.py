"""Cache storage: one tensor per cached quantity, [slots, max_seq_len, *shape], kept in the compute dtype or in
float8_e4m3fn with one fp32 scale per token (per row of the last dimension: per head in naive mode)."""

import torch
from torch import nn

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


class CacheTensor(nn.Module):
    def __init__(self, slots: int, seq_len: int, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.fp8 = dtype == torch.float8_e4m3fn
        self.register_buffer("data", torch.zeros(slots, seq_len, *shape, dtype=dtype), persistent=False)
        if self.fp8:
            self.register_buffer("scale", torch.zeros(slots, seq_len, *shape[:-1]), persistent=False)
        else:
            self.scale = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.fp8 else 0)

    def write(self, batch, values: torch.Tensor) -> None:
        """Store the batch's valid tokens' values [B, T, *shape], quantising them when the cache is FP8."""
        if not self.fp8:
            batch.write(self.data, values)
            return
        values = values.float()
        scale = values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        batch.write(self.data, (values / scale).to(torch.float8_e4m3fn))
        batch.write(self.scale, scale.squeeze(-1))

    def read(self, batch, dtype: torch.dtype) -> torch.Tensor:
        """The batch rows' first kv_len positions, [B, S, *shape], in `dtype`."""
        data = batch.read(self.data)
        if not self.fp8:
            return data
        return (data.float() * batch.read(self.scale).unsqueeze(-1)).to(dtype)
