"""The cuda backend's router kernel (tp_infer.backends.triton_router) against the model's own router, Gate.route, the
torch ops it replaces: V3's sigmoid with a bias and groups, V2's softmax with groups, V2-Lite's softmax over all
experts, Kimi-style sigmoid without groups; normalised or not, scaled or not; fp32 and fp16 tokens; 1 to 33 tokens.
Ties (lowest index wins), what the kernel declines, and (with a GPU) a CUDA graph holding the launch. Without a GPU
the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here before Triton is imported)."""

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tp_infer.backends import triton_router  # noqa: E402
from tp_infer.config import ModelArgs  # noqa: E402
from tp_infer.model.moe import Gate  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DIM = 32


@dataclass(frozen=True)
class Router:
    """A router's shape: experts in groups, topk_groups groups kept, topk experts chosen."""

    experts: int
    groups: int
    topk_groups: int
    topk: int
    score_func: str
    route_norm: bool
    route_scale: float


V3 = Router(256, 8, 4, 8, "sigmoid", True, 2.5)
V3_TINY = Router(16, 4, 2, 4, "sigmoid", True, 1.0)
V2 = Router(160, 8, 3, 6, "softmax", False, 16.0)  # 20 experts a group: padded to 32 in the kernel
V2_TINY = Router(64, 8, 3, 6, "softmax", False, 1.0)
V2_LITE = Router(64, 1, 1, 6, "softmax", False, 1.0)
KIMI = Router(384, 1, 1, 8, "sigmoid", True, 2.827)  # a bias without groups; 384 padded to 512


def gate_of(router: Router, seed: int, bias: torch.Tensor | None = None) -> Gate:
    """A Gate of this shape with random weights (logits of about unit spread) and, for sigmoid scoring, a bias of
    the size of the scores' differences, so that it moves the choice."""
    args = ModelArgs(
        dim=DIM, n_routed_experts=router.experts, n_expert_groups=router.groups, n_limited_groups=router.topk_groups,
        n_activated_experts=router.topk, score_func=router.score_func, route_norm=router.route_norm,
        route_scale=router.route_scale,
    )  # fmt: skip
    gate = Gate(args)
    generator = torch.Generator().manual_seed(seed)
    gate.weight.data = torch.randn(router.experts, DIM, generator=generator) / DIM**0.5
    if gate.bias is not None:
        gate.bias.data = torch.randn(router.experts, generator=generator) * 0.1 if bias is None else bias
    return gate.to(DEVICE)


def kernel_route(gate: Gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The call the cuda backend makes: torch's fp32 logits, then the kernel."""
    logits = F.linear(x.float(), gate.weight)
    return triton_router.route(
        logits, gate.bias, sigmoid=gate.score_func == "sigmoid", n_groups=gate.n_groups,
        topk_groups=gate.topk_groups, topk=gate.topk, route_norm=gate.route_norm, route_scale=gate.route_scale,
        out_dtype=x.dtype,
    )  # fmt: skip


def by_index(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's indices sorted, and its weights in the same order."""
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


@pytest.mark.parametrize(
    "router, tokens, dtype",
    [
        (V3, 33, torch.float32),
        (V3, 1, torch.float16),
        (V3_TINY, 5, torch.float16),
        (Router(16, 4, 2, 4, "sigmoid", False, 1.0), 33, torch.float32),
        (V2, 5, torch.float32),
        (V2_TINY, 33, torch.float16),
        (Router(64, 8, 3, 6, "softmax", True, 1.0), 1, torch.float32),
        (V2_LITE, 33, torch.float32),
        (V2_LITE, 5, torch.float16),
        (Router(64, 1, 1, 6, "softmax", True, 1.5), 5, torch.float32),
        (KIMI, 5, torch.float32),
    ],
    ids=lambda v: (
        f"{v.experts}e{v.groups}g{v.topk_groups}k{v.topk}-{v.score_func}-norm{int(v.route_norm)}"
        if isinstance(v, Router)
        else str(v).removeprefix("torch.")
    ),
)
def test_route_as_the_gate(router: Router, tokens: int, dtype: torch.dtype):
    gate = gate_of(router, seed=tokens + router.experts)
    x = torch.randn(tokens, DIM, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
    expected_weights, expected = gate.route(x)
    weights, indices = kernel_route(gate, x)
    assert weights.dtype == dtype and indices.dtype == torch.int64 and indices.shape == (tokens, router.topk)
    expected_weights, expected = by_index(expected_weights, expected)
    sorted_weights, sorted_indices = by_index(weights, indices)
    assert torch.equal(sorted_indices, expected)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(sorted_weights, expected_weights, rtol=tolerance, atol=tolerance)
    # the choices come as torch's topk gives them (descending), and group-limited ones from topk_groups groups
    assert torch.equal(indices, gate.route(x)[1])
    if router.groups > 1:
        groups = indices // (router.experts // router.groups)
        assert all(len(set(row)) <= router.topk_groups for row in groups.tolist())


def test_bias_and_groups_change_the_choice():
    """The cases above would catch a kernel ignoring the bias or the groups: on the same tokens, V3's choice differs
    from the choice without its bias, and from the choice without groups."""
    x = torch.randn(33, DIM, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    gate = gate_of(V3, seed=1)
    _, chosen = kernel_route(gate, x)
    unbiased = gate_of(V3, seed=1, bias=torch.zeros(256))
    ungrouped = gate_of(Router(256, 1, 1, 8, "sigmoid", True, 2.5), seed=1, bias=gate.bias.data.cpu())
    for other in (unbiased, ungrouped):
        assert not torch.equal(chosen.sort(dim=-1)[0], kernel_route(other, x)[1].sort(dim=-1)[0])


@pytest.mark.parametrize(
    "bias, expected",
    [
        (torch.zeros(16), [0, 1, 2, 3, 4, 5]),  # all equal: groups 0 and 1, then their lowest experts
        (torch.tensor([0.0] * 8 + [1.0] * 8), [8, 9, 10, 11, 12, 13]),  # groups 2 and 3 lead, equal inside
    ],
)
def test_ties_go_to_the_lowest_index(bias: torch.Tensor, expected: list[int]):
    gate = gate_of(Router(16, 4, 2, 6, "sigmoid", True, 1.0), seed=0, bias=bias)
    gate.weight.data.zero_()  # every logit 0: every score 0.5
    weights, indices = kernel_route(gate, torch.randn(3, DIM, device=DEVICE))
    assert indices.tolist() == [expected] * 3
    torch.testing.assert_close(weights, torch.full((3, 6), 1 / 6, device=DEVICE))


def test_no_tokens():
    weights, indices = kernel_route(gate_of(V3_TINY, seed=0), torch.zeros(0, DIM, device=DEVICE))
    assert weights.shape == indices.shape == (0, 4)


def test_takes_deepseeks_routers_and_names_what_it_declines():
    for router in (V3, V2, V2_LITE, KIMI):
        shape = dict(n_groups=router.groups, topk_groups=router.topk_groups, topk=router.topk)
        assert triton_router.takes(n_experts=router.experts, bias=router.score_func == "sigmoid", **shape)
    logits = torch.zeros(2, 64, device=DEVICE)
    declined = [
        (dict(n_groups=3, topk_groups=1, topk=2), None, "n_groups=3"),
        (dict(n_groups=8, topk_groups=2, topk=17), None, "topk=17"),
        (dict(n_groups=1, topk_groups=1, topk=33), None, "topk=33"),
        (dict(n_groups=8, topk_groups=9, topk=2), None, "topk_groups=9"),
        (dict(n_groups=64, topk_groups=4, topk=2), torch.zeros(64, device=DEVICE), "best two"),
    ]
    for shape, bias, culprit in declined:
        with pytest.raises(ValueError, match=culprit):
            triton_router.route(
                logits, bias, sigmoid=True, route_norm=True, route_scale=1.0, out_dtype=torch.float32, **shape
            )
    with pytest.raises(ValueError, match="2048"):
        triton_router.route(
            torch.zeros(1, 2048, device=DEVICE), None, sigmoid=False, n_groups=1, topk_groups=1, topk=2,
            route_norm=False, route_scale=1.0, out_dtype=torch.float32,
        )  # fmt: skip
    with pytest.raises(ValueError, match="fp32"):
        triton_router.route(
            logits.half(), None, sigmoid=False, n_groups=1, topk_groups=1, topk=2, route_norm=False, route_scale=1.0,
            out_dtype=torch.float32,
        )  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_a_cuda_graph_holds_the_launch():
    """Captured once, replayed on other tokens: the same as an eager call on them (nothing read back, nothing
    allocated by shape from data)."""
    gate = gate_of(V3, seed=2)
    x = torch.randn(8, DIM, device=DEVICE, dtype=torch.bfloat16)
    kernel_route(gate, x)  # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, indices = kernel_route(gate, x)
    x.copy_(torch.randn(8, DIM, device=DEVICE))
    graph.replay()
    expected_weights, expected = kernel_route(gate, x)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(weights, expected_weights)
    assert torch.equal(indices.sort(dim=-1)[0], gate.route(x)[1].sort(dim=-1)[0])
