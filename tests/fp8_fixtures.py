"""Tiny DeepSeek-V3 Hugging Face checkpoints for tests: a bf16 one from transformers, and its FP8 twin.

The FP8 twin has DeepSeek's layout: every attention/MLP/expert projection is float8_e4m3fn with a
`<name>_scale_inv` fp32 tensor of 128x128 block scales, and config.json carries `quantization_config`.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tp_infer.model import fp8

INDEX = "model.safetensors.index.json"
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [fp8.BLOCK, fp8.BLOCK],
}


def tiny_config(**overrides: object):
    """A 2-layer DeepSeek-V3 config (one dense layer, one MoE layer) with dims that leave partial 128-blocks."""
    from transformers import DeepseekV3Config

    kwargs = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=320,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def make_bf16_checkpoint(dst_dir: Path, max_shard_size: str = "200KB", seed: int = 0, **config: object) -> Path:
    """Save a randomly initialised tiny DeepseekV3ForCausalLM in bf16 (sharded unless max_shard_size is large)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(tiny_config(**config)).to(torch.bfloat16)
    model.save_pretrained(dst_dir, max_shard_size=max_shard_size)
    return Path(dst_dir)


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Projections of attention, MLP and experts (q_a_proj, kv_a_proj_with_mqa, down_proj, ...), as DeepSeek ships,
    and V3.2's indexer's wq_b and wk (its weights_proj stays bf16, as in DeepSeek's reference).

    Embedding, lm_head, norms and the router gate stay bf16.
    """
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    module = name.split(".")[-2]
    return module in ("wq_b", "wk") if ".indexer." in name else "_proj" in module


def make_fp8_checkpoint(src_dir: Path, dst_dir: Path, cross_shard_scale: bool = True) -> Path:
    """Write the FP8 version of the bf16 Hugging Face folder `src_dir` into `dst_dir`; return `dst_dir`.

    Works on a sharded folder (index + shards) or a single model.safetensors. With `cross_shard_scale`, the
    first quantised weight's scale is stored in the last shard, as happens in real DeepSeek checkpoints.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name not in (INDEX, "config.json"):
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, dst / path.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    files = sorted(p.name for p in src.glob("*.safetensors"))
    shards = {file: load_file(src / file) for file in files}
    moved: tuple[str, torch.Tensor] | None = None
    for tensors in shards.values():
        for name in [n for n, t in tensors.items() if is_quantized(n, t)]:
            weight, scale = fp8.quantize(tensors[name])
            tensors[name] = weight
            if cross_shard_scale and moved is None and len(files) > 1:
                moved = (name + "_scale_inv", scale)
            else:
                tensors[name + "_scale_inv"] = scale
    if moved is not None:
        shards[files[-1]][moved[0]] = moved[1]

    weight_map: dict[str, str] = {}
    for file, tensors in shards.items():
        save_file(tensors, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    if (src / INDEX).exists():
        index = json.loads((src / INDEX).read_text())
        all_tensors = [t for tensors in shards.values() for t in tensors.values()]
        index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in all_tensors)
        if "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] = sum(t.numel() for t in all_tensors)
        index["weight_map"] = dict(sorted(weight_map.items()))
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return dst
