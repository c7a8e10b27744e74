"""The DeepSeek-V2/V3 transformer, tensor-parallel, taking several tokens at any start position per cache slot."""

import torch
from torch import nn

from tp_infer.config import ModelArgs
from tp_infer.distributed import all_gather_last_dim, gather_last_dim
from tp_infer.model.attention import MLA, AttentionBatch
from tp_infer.model.layers import ColumnParallelLinear, ParallelEmbedding, RMSNorm, TensorParallel
from tp_infer.model.moe import MLP, MoE
from tp_infer.model.rope import rope_cos_sin

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.attn = MLA(args, tp, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim, tp, dtype, args.fp8_weights)
        else:
            self.ffn = MoE(args, tp, dtype)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), batch)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Embedding, blocks, final norm and the vocab-parallel head; state dict names follow DeepSeek's reference."""

    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None):
        super().__init__()
        tp = tp or TensorParallel()
        args.check_world_size(tp.world_size)
        self.args, self.tp = args, tp
        dtype = DTYPES[args.dtype]
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, tp, dtype)
        self.layers = nn.ModuleList(Block(i, args, tp, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, tp, dtype)
        cos, sin = rope_cos_sin(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: torch.Tensor,
        slots: torch.Tensor,
        num_new: torch.Tensor | None = None,
        last_only: bool = True,
        logits_on_all_ranks: bool = True,
    ) -> torch.Tensor | None:
        """Run rows of new tokens [B, T] (row b holds num_new[b] real tokens, the rest padding) at positions
        start_pos[b].. in cache slot slots[b]. Returns fp32 logits of each row's last real token [B, V], or of
        every position [B, T, V] with last_only=False; with logits_on_all_ranks=False only rank 0 gets them."""
        bsz, seqlen = tokens.shape
        device = tokens.device
        if num_new is None:
            num_new = torch.full((bsz,), seqlen, dtype=torch.long, device=device)
        offsets = torch.arange(seqlen, device=device)
        positions = start_pos[:, None] + offsets
        valid = offsets < num_new[:, None]
        kv_len = int((start_pos + num_new).max())
        if kv_len > self.args.max_seq_len:
            raise ValueError(f"forward reaches position {kv_len}, past max_seq_len={self.args.max_seq_len}")
        table_index = positions.clamp(max=self.args.max_seq_len - 1)
        visible = torch.arange(kv_len, device=device) <= positions[:, :, None]
        slot_list = slots.tolist()
        contiguous = slot_list == list(range(slot_list[0], slot_list[0] + bsz))
        batch = AttentionBatch(
            slots=slots,
            positions=positions,
            valid=valid,
            visible=visible,
            cos=self.rope_cos[table_index],
            sin=self.rope_sin[table_index],
            slot_range=slice(slot_list[0], slot_list[0] + bsz) if contiguous else None,
        )
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, batch)
        if last_only:
            h = h[torch.arange(bsz, device=device), num_new - 1].unsqueeze(1)
        local = self.head(self.norm(h)).float()
        if logits_on_all_ranks:
            logits = all_gather_last_dim(local, self.tp.world_size)
        else:
            logits = gather_last_dim(local, self.tp.rank, self.tp.world_size)
            if logits is None:
                return None
        return logits.squeeze(1) if last_only else logits
