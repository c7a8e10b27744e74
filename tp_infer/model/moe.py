"""Feed-forward layers: the tensor-parallel dense MLP, the router, and the mixture of experts split across ranks."""

import torch
import torch.nn.functional as F
from torch import nn

from tp_infer.config import ModelArgs
from tp_infer.distributed import all_reduce
from tp_infer.model import kernels
from tp_infer.model.layers import ColumnParallelLinear, Linear, RowParallelLinear, TensorParallel


def swiglu(x: torch.Tensor, w1: Linear, w2: Linear, w3: Linear, scale: torch.Tensor | None = None) -> torch.Tensor:
    """w2(silu(w1(x)) * w3(x)) over these layers' slices, not reduced: one compiled call for a few fp32 rows on the
    CPU (decode), else five ops. scale [M, 1] (routing weights) multiplies each row's result; in the five ops, its
    hidden values: the same result, on a tensor inter_dim wide instead of dim."""
    y = kernels.swiglu(x, w1.dense_weight(x.dtype), w3.dense_weight(x.dtype), w2.dense_weight(x.dtype))
    if y is not None:
        return y if scale is None else y.mul_(scale)
    hidden = F.silu(w1(x)).mul_(w3(x))
    return w2(hidden if scale is None else hidden.mul_(scale))


class MLP(nn.Module):
    """SwiGLU with w1/w3 column-parallel and w2 row-parallel; `reduce=False` leaves the all-reduce to the caller."""

    def __init__(self, dim: int, inter_dim: int, tp: TensorParallel, dtype: torch.dtype, fp8: bool, reduce=True):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim, tp, dtype, fp8)
        self.w2 = RowParallelLinear(inter_dim, dim, tp, dtype, fp8, reduce=False)
        self.w3 = ColumnParallelLinear(dim, inter_dim, tp, dtype, fp8)
        self.world_size, self.reduce = tp.world_size, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = swiglu(x, self.w1, self.w2, self.w3)
        return all_reduce(y, self.world_size) if self.reduce else y


class Expert(nn.Module):
    """One routed expert, whole on the rank that owns it."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, fp8: bool):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype, fp8)
        self.w2 = Linear(inter_dim, dim, dtype, fp8)
        self.w3 = Linear(dim, inter_dim, dtype, fp8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's output for x [M, dim], each row times its routing weight scale [M, 1] if given."""
        return swiglu(x, self.w1, self.w2, self.w3, scale)


class Gate(nn.Module):
    """Router: softmax or sigmoid scores; the optional bias steers the choice only; group-limited top-k."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = (
            args.n_activated_experts,
            args.n_expert_groups,
            args.n_limited_groups,
        )
        self.score_func, self.route_scale, self.route_norm = args.score_func, args.route_scale, args.route_norm
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype), requires_grad=False)
        if args.score_func == "sigmoid":
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [N, topk] (in x's dtype) and expert indices [N, topk]."""
        sigmoid = self.score_func == "sigmoid"
        rules = (sigmoid, self.n_groups, self.topk_groups, self.topk, self.route_norm, self.route_scale)
        routed = kernels.route(x, self.weight, self.bias, *rules)  # decode's few rows, compiled
        if routed is not None:
            return routed
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            grouped = choice.view(x.size(0), self.n_groups, -1)
            # without a bias a group scores its best expert; with one, its best two (as V3 was trained)
            group_scores = grouped.amax(dim=-1) if self.bias is None else grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.route_norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices


class MoE(nn.Module):
    """Routed experts [rank*E/ws, (rank+1)*E/ws) live here; the shared experts are tensor-parallel. Both partial
    sums are added before a single all-reduce."""

    def __init__(self, args: ModelArgs, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.world_size = tp.world_size
        self.n_routed = args.n_routed_experts
        local = tp.split(args.n_routed_experts)
        self.first_expert = tp.rank * local
        self.gate = Gate(args, dtype)
        fp8 = args.fp8_weights
        self.experts = nn.ModuleDict(
            {
                str(i): Expert(args.dim, args.moe_inter_dim, dtype, fp8)
                for i in range(self.first_expert, self.first_expert + local)
            }
        )
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, tp, dtype, fp8, reduce=False)
            if args.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(x)
        y = self.compiled(x, weights, indices)
        if y is not None:
            return all_reduce(y, self.world_size).view(shape)
        y = torch.zeros_like(x) if self.shared_experts is None else self.shared_experts(x)
        if x.shape[0] == 1:  # a lone token (batch-1 decode): no sort or gather; its local experts added in ascending
            # order, as the index_add below adds them
            for choice, e in sorted(enumerate(indices[0].tolist()), key=lambda pair: pair[1]):
                if str(e) in self.experts:
                    y.add_(self.experts[str(e)](x) * weights[:, choice, None])
            return all_reduce(y, self.world_size).view(shape)
        # the (token, choice) pairs sorted by expert, stably: each local expert runs once on a contiguous run of its
        # tokens, gathered in one go, its routing weights applied inside it, and its outputs added to their tokens
        # (so each token adds its experts in ascending order)
        choices = indices.flatten()
        counts = torch.bincount(choices, minlength=self.n_routed).tolist()
        local = counts[self.first_expert : self.first_expert + len(self.experts)]
        first = sum(counts[: self.first_expert])
        pairs = choices.argsort(stable=True)[first : first + sum(local)]
        rows, scales = pairs // indices.shape[1], weights.flatten()[pairs, None]
        tokens, start = x.index_select(0, rows), 0
        for count, expert in zip(local, self.experts.values(), strict=True):
            end = start + count
            if count:
                y.index_add_(0, rows[start:end], expert(tokens[start:end], scales[start:end]))
            start = end
        return all_reduce(y, self.world_size).view(shape)

    def compiled(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The shared and routed experts in one compiled call for up to MAX_ROWS fp32 tokens on the CPU (decode,
        short extends; not reduced); None where it does not apply."""
        if not kernels.few_rows(x):
            return None
        local = range(self.first_expert, self.first_expert + len(self.experts))
        chosen = {e for e in indices.flatten().tolist() if e in local}
        experts = {e: layer_weights(self.experts[str(e)], x.dtype) for e in chosen}
        shared = None if self.shared_experts is None else layer_weights(self.shared_experts, x.dtype)
        return kernels.moe(x, weights, indices, experts, shared)


def layer_weights(mlp: MLP | Expert, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A SwiGLU's (w1, w3, w2) in `dtype`, as the compiled kernels take them."""
    return mlp.w1.dense_weight(dtype), mlp.w3.dense_weight(dtype), mlp.w2.dense_weight(dtype)
