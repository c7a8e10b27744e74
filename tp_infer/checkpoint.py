"""Per-rank checkpoint shards: naming, Hugging Face name mapping, and loading with every tensor checked."""

import re
from pathlib import Path

import torch
from safetensors import safe_open

from tp_infer.backends import Backend
from tp_infer.config import ModelArgs
from tp_infer.distributed import StartupError, agree
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import Transformer

# Hugging Face name components -> DeepSeek reference names (the names our state dict uses).
HF_TO_REF = {
    "embed_tokens": "embed",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
    "lm_head": "head",
    "self_attn": "attn",
    "mlp": "ffn",
    "weight_scale_inv": "scale",
    "e_score_correction_bias": "bias",
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the file or tensor."""


def shard_name(rank: int, world_size: int) -> str:
    return f"model{rank}-mp{world_size}.safetensors"


def ref_name(hf_name: str) -> str:
    """`model.layers.3.mlp.experts.7.gate_proj.weight_scale_inv` -> `layers.3.ffn.experts.7.w1.scale`."""
    parts = hf_name.removeprefix("model.").split(".")
    return ".".join(HF_TO_REF.get(p, p) for p in parts)


def layer_index(name: str) -> int | None:
    match = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def expected_shapes(args: ModelArgs, tp: TensorParallel) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor a rank's shard must hold, with its shape and stored dtype, from a model built on `meta`."""
    with torch.device("meta"):
        model = Transformer(args.with_options(max_batch_size=1, max_seq_len=1), tp)
    return {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}


def weight_bytes(args: ModelArgs, tp: TensorParallel) -> int:
    """Bytes of one rank's weights, counted on a model built on `meta` (nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(args, tp)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_shard(model: Transformer, ckpt_dir: str | Path) -> None:
    """Fill this rank's model from its shard, refusing a shard for another world size or any missing, extra,
    mis-shaped or wrongly quantised tensor."""
    ckpt_dir, tp = Path(ckpt_dir), model.tp
    path = ckpt_dir / shard_name(tp.rank, tp.world_size)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist")
    if not path.exists():
        others = sorted(p.name for p in ckpt_dir.glob("model*-mp*.safetensors"))
        if others:
            sizes = sorted({int(re.search(r"-mp(\d+)", name).group(1)) for name in others})
            if tp.world_size in sizes:
                raise CheckpointError(
                    f"{path} is missing: the shards for world size {tp.world_size} are incomplete; "
                    f"convert with --model-parallel {tp.world_size} again"
                )
            raise CheckpointError(
                f"{ckpt_dir} holds shards for world size {', '.join(map(str, sizes))}, not {tp.world_size} "
                f"({path.name} is missing); convert with --model-parallel {tp.world_size}"
            )
        raise CheckpointError(f"{path} is missing: convert a checkpoint with scripts/convert.py first")
    params = model.state_dict()
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("world_size", str(tp.world_size)) != str(tp.world_size):
            raise CheckpointError(f"{path.name} was written for world size {meta['world_size']}, not {tp.world_size}")
        names = set(f.keys())
        missing = sorted(set(params) - names)
        if missing:
            raise CheckpointError(f"{path.name}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
        extra = sorted(names - set(params))
        if extra:
            raise CheckpointError(f"{path.name}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
        for name, param in params.items():
            tensor = f.get_tensor(name)
            if tensor.shape != param.shape:
                raise CheckpointError(
                    f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            if (tensor.dtype == torch.float8_e4m3fn) != (param.dtype == torch.float8_e4m3fn):
                raise CheckpointError(
                    f"{path.name}: tensor {name} is {tensor.dtype}, the config says {param.dtype} "
                    "(FP8 weights and config.json disagree)"
                )
            param.copy_(tensor)


def load_model(
    args: ModelArgs, ckpt_dir: str | Path, tp: TensorParallel, device: torch.device, backend: Backend | None = None
) -> Transformer:
    """Build and load this rank's model (its hardware paths through `backend`, by default the device's and dtype's
    pick). Every rank learns of any rank's failure, so none is left waiting."""
    error, model = None, None
    try:
        with torch.device(device):
            model = Transformer(args, tp, backend)
        load_shard(model, ckpt_dir)
    except ValueError as e:  # CheckpointError, ConfigError
        error = str(e)
    try:
        agree(error, tp.world_size)
    except StartupError as e:
        raise CheckpointError(str(e)) from None
    return model.eval()
