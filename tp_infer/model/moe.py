"""Feed-forward layers: the tensor-parallel dense MLP, the router, and the mixture of experts split across ranks."""

import torch
import torch.nn.functional as F
from torch import nn

from tp_infer.config import ModelArgs
from tp_infer.distributed import all_reduce
from tp_infer.model import fp8
from tp_infer.model.layers import ColumnParallelLinear, Layer, RowParallelLinear, TensorParallel


class MLP(Layer):
    """SwiGLU with w1/w3 column-parallel and w2 row-parallel; `reduce=False` leaves the all-reduce to the caller."""

    def __init__(self, dim: int, inter_dim: int, tp: TensorParallel, dtype: torch.dtype, fp8: bool, reduce=True):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim, tp, dtype, fp8)
        self.w2 = RowParallelLinear(inter_dim, dim, tp, dtype, fp8, reduce=False)
        self.w3 = ColumnParallelLinear(dim, inter_dim, tp, dtype, fp8)
        self.world_size, self.reduce = tp.world_size, reduce

    def layers(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        """(weight, scale or None) of w1, w3 and w2."""
        return tuple((layer.weight, layer.scale) for layer in (self.w1, self.w3, self.w2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.swiglu(x, self)
        return all_reduce(y, self.world_size) if self.reduce else y


class Experts(nn.Module):
    """This rank's routed experts, experts [first, first + count) of the model, stacked: w1 and w3 [count, inter, dim],
    w2 [count, dim, inter] (FP8 with scales [count, ceil(rows / 128), ceil(cols / 128)], or the compute dtype), so that
    a backend can run them all in one grouped product. The state dict keeps the checkpoint's names, one expert at a
    time (`{first + e}.w1.weight`, `.scale`): views of the stacks, which loading fills in place."""

    def __init__(self, first: int, count: int, dim: int, inter_dim: int, dtype: torch.dtype, fp8_weights: bool):
        super().__init__()
        self.first, self.count = first, count
        weight_dtype = torch.float8_e4m3fn if fp8_weights else dtype
        for name, (rows, cols) in {"w1": (inter_dim, dim), "w2": (dim, inter_dim), "w3": (inter_dim, dim)}.items():
            weight = torch.empty(count, rows, cols, dtype=weight_dtype)
            self.register_parameter(name, nn.Parameter(weight, requires_grad=False))
            scale = torch.empty(count, *fp8.scale_shape(rows, cols)) if fp8_weights else None
            self.register_parameter(
                f"{name}_scale", None if scale is None else nn.Parameter(scale, requires_grad=False)
            )
        self._register_state_dict_hook(Experts._one_by_one)
        self._register_load_state_dict_pre_hook(Experts._stacked)

    @property
    def fp8(self) -> bool:
        return self.w1_scale is not None

    def of(self, e: int) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        """Expert e's (counted from `first`) (weight, scale or None) of w1, w3 and w2: views of the stacks."""
        scales = (self.w1_scale, self.w3_scale, self.w2_scale)
        return tuple(
            (w[e], None if s is None else s[e]) for w, s in zip((self.w1, self.w3, self.w2), scales, strict=True)
        )

    def dense(self, name: str, dtype: torch.dtype, backend, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Weight `name` (w1, w2 or w3) of every local expert, or of the experts `chosen` [P] (counted from `first`),
        stacked in `dtype` (dequantised by the backend when FP8)."""
        weight, scale = getattr(self, name), getattr(self, f"{name}_scale")
        if chosen is not None:
            weight, scale = weight.index_select(0, chosen), None if scale is None else scale.index_select(0, chosen)
        return backend.dense_weight(weight, scale, dtype)

    @staticmethod
    def _one_by_one(module: "Experts", state: dict, prefix: str, _metadata) -> None:
        """The stacks as the checkpoint's per-expert tensors, where the stacks stood and in its order."""
        attributes = [(name, suffix) for name in ("w1", "w2", "w3") for suffix in ("weight", "scale")]
        stacked = {f"{prefix}{name}" if suffix == "weight" else f"{prefix}{name}_scale" for name, suffix in attributes}
        items = list(state.items())
        state.clear()
        for key, value in items:
            if key not in stacked:
                state[key] = value
            elif key == f"{prefix}w1":
                for e in range(module.count):
                    for name, suffix in attributes:
                        tensor = getattr(module, name if suffix == "weight" else f"{name}_scale")
                        if tensor is not None:
                            state[f"{prefix}{module.first + e}.{name}.{suffix}"] = tensor.detach()[e]

    @staticmethod
    def _stacked(module: "Experts", state: dict, prefix: str, *_args) -> None:
        for name in ("w1", "w2", "w3"):
            for suffix, attribute in (("weight", name), ("scale", f"{name}_scale")):
                keys = [f"{prefix}{module.first + e}.{name}.{suffix}" for e in range(module.count)]
                if all(key in state for key in keys):
                    state[prefix + attribute] = torch.stack([state.pop(key) for key in keys])


class Gate(Layer):
    """Router: softmax or sigmoid scores; the optional bias steers the choice only; group-limited top-k."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = (
            args.n_activated_experts,
            args.n_expert_groups,
            args.n_limited_groups,
        )
        self.score_func, self.route_scale, self.route_norm = args.score_func, args.route_scale, args.route_norm
        # fp32, as transformers keeps it: the router's product runs in fp32 without a copy of its weight each step
        self.weight = nn.Parameter(
            torch.empty(args.n_routed_experts, args.dim, dtype=torch.float32), requires_grad=False
        )
        if args.score_func == "sigmoid":
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [N, topk] (in x's dtype) and expert indices [N, topk]."""
        return self.backend.route(x, self)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's math (Gate.forward's result), in plain ops."""
        logits = F.linear(x.float(), self.weight)
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


class MoE(Layer):
    """Routed experts [rank*E/ws, (rank+1)*E/ws) live here; the shared experts are tensor-parallel. Both partial
    sums are added before a single all-reduce."""

    def __init__(self, args: ModelArgs, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.world_size = tp.world_size
        local = tp.split(args.n_routed_experts)
        self.gate = Gate(args)
        self.experts = Experts(tp.rank * local, local, args.dim, args.moe_inter_dim, dtype, args.fp8_weights)
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, tp, dtype, args.fp8_weights, reduce=False)
            if args.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(x)
        y = self.backend.experts(x, weights, indices, self.experts, self.shared_experts)
        return all_reduce(y, self.world_size).view(shape)
