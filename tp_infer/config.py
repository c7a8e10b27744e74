"""Model configuration: one dataclass, loaded from a reference-style JSON or a Hugging Face config.json."""

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

# Hugging Face config.json names that map one-to-one onto ModelArgs fields.
HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups",
    "routed_scaling_factor": "route_scale",
    "norm_topk_prob": "route_norm",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "rms_norm_eps": "norm_eps",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
}
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")


class ConfigError(ValueError):
    """A configuration that cannot describe a runnable model; the message names the culprit."""


@dataclass(frozen=True)
class ModelArgs:
    """Architecture (from the checkpoint) plus runtime options (max_seq_len, max_batch_size, attn_impl, dtype)."""

    # runtime
    max_batch_size: int = 8
    max_seq_len: int = 16384
    dtype: Literal["bf16", "fp32"] = "bf16"
    attn_impl: Literal["naive", "absorb"] = "absorb"
    kv_cache_dtype: Literal["auto", "bf16", "fp32", "fp8"] = "auto"  # auto: the compute dtype
    # architecture
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    route_norm: bool | None = None  # renormalise the top-k weights; None: only for sigmoid scoring
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    # rope / yarn: YaRN is active whenever rope_factor > 1, as in transformers and vLLM
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    # DeepSeek Sparse Attention (V3.2): a lightning indexer of index_n_heads x index_head_dim per layer picks the
    # index_topk positions each query attends to; index_topk 0 is dense attention (V2, V3)
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 0
    mscale: float = 1.0  # softmax mscale (mscale_all_dim in Hugging Face configs)
    rope_mscale: float = 1.0  # factor on cos/sin (yarn attention_factor in Hugging Face configs)
    # weights on disk
    fp8_weights: bool = False
    scale_fmt: str | None = None  # V3.1 "ue8m0": activation quantisation of FP8 GEMM kernels; dequant ignores it

    def __post_init__(self) -> None:
        if self.route_norm is None:
            object.__setattr__(self, "route_norm", self.score_func == "sigmoid")
        choices = {
            "dtype": ("bf16", "fp32"),
            "attn_impl": ("naive", "absorb"),
            "kv_cache_dtype": ("auto", "bf16", "fp32", "fp8"),
            "score_func": ("softmax", "sigmoid"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        for name in ("max_batch_size", "max_seq_len", "vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        if self.n_dense_layers < self.n_layers:
            if self.n_routed_experts % self.n_expert_groups:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not divisible by "
                    f"n_expert_groups={self.n_expert_groups}"
                )
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ConfigError(f"n_limited_groups={self.n_limited_groups}: must be in 1..n_expert_groups")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ConfigError(f"n_activated_experts={self.n_activated_experts}: must be in 1..n_routed_experts")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim}: must be even")
        if self.sparse:
            if self.index_n_heads <= 0:
                raise ConfigError(f"index_n_heads={self.index_n_heads}: must be positive with index_topk > 0")
            if not self.qk_rope_head_dim <= self.index_head_dim:
                raise ConfigError(
                    f"index_head_dim={self.index_head_dim}: must hold the rope part ({self.qk_rope_head_dim})"
                )
            if self.q_lora_rank <= 0:
                raise ConfigError("index_topk > 0 needs q_lora_rank > 0: the indexer reads the query latent")
        elif self.index_topk < 0:
            raise ConfigError(f"index_topk={self.index_topk}: must be 0 (dense) or positive")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def sparse(self) -> bool:
        """DeepSeek Sparse Attention: each query attends to the index_topk positions its indexer scores highest."""
        return self.index_topk > 0

    @property
    def model_type(self) -> str:
        """The Hugging Face model_type of this architecture (V2 scores its experts with a softmax, V3 a sigmoid)."""
        if self.sparse:
            return "deepseek_v32"
        return "deepseek_v3" if self.score_func == "sigmoid" else "deepseek_v2"

    @property
    def yarn(self) -> bool:
        return self.rope_factor > 1

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn:
            scale *= yarn_mscale(self.rope_factor, self.mscale) ** 2
        return scale

    def with_options(self, **options) -> "ModelArgs":
        """A copy with runtime options replaced; options given as None keep their value."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def check_world_size(self, world_size: int) -> None:
        """Refuse, naming the field, a config whose parallel dimensions do not split evenly over world_size."""
        splits = {"n_heads": self.n_heads, "vocab_size": self.vocab_size}
        if self.n_dense_layers > 0:
            splits["inter_dim"] = self.inter_dim
        if self.n_dense_layers < self.n_layers:
            splits["n_routed_experts"] = self.n_routed_experts
            if self.n_shared_experts:
                splits["moe_inter_dim"] = self.moe_inter_dim
        for name, value in splits.items():
            if value % world_size:
                raise ConfigError(f"{name}={value} is not divisible by the world size {world_size}")


def yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def load_config(path: str | Path, **options) -> ModelArgs:
    """Read a reference-style JSON or a Hugging Face config.json (told apart by `model_type`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        args = _from_hf(raw) if "model_type" in raw else _from_reference(raw)
        return args.with_options(**options)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _from_reference(raw: dict) -> ModelArgs:
    raw = dict(raw)
    weight_dtype = raw.pop("dtype", "bf16")
    if weight_dtype not in ("bf16", "fp8"):
        raise ConfigError(f"dtype={weight_dtype!r}: a reference config's weight dtype must be bf16 or fp8")
    known = {f.name for f in fields(ModelArgs)} - {"dtype", "fp8_weights"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r}")
    return ModelArgs(**raw, fp8_weights=weight_dtype == "fp8")


def _from_hf(raw: dict) -> ModelArgs:
    model_type = raw["model_type"]
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r}: only {', '.join(MODEL_TYPES)} are supported")
    if raw.get("rope_interleave") is False:
        raise ConfigError(
            "rope_interleave=false: DeepSeek weights rotate interleaved pairs; no other layout is supported"
        )
    kw = {ours: raw[theirs] for theirs, ours in HF_NAMES.items() if raw.get(theirs) is not None}
    kw["q_lora_rank"] = raw.get("q_lora_rank") or 0
    kw["score_func"] = raw.get("scoring_func", "softmax") if model_type == "deepseek_v2" else "sigmoid"
    if model_type == "deepseek_v32":
        kw.setdefault("index_n_heads", 64)
        kw.setdefault("index_topk", 2048)
    else:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            kw.pop(name, None)
    if model_type == "deepseek_v2" and raw.get("topk_method", "greedy") == "greedy":
        kw["n_expert_groups"] = kw["n_limited_groups"] = 1  # plain greedy top-k ignores the groups
    if raw.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"moe_layer_freq={raw['moe_layer_freq']}: only 1 is supported")
    kw.update(_rope_from_hf(raw))
    quant = raw.get("quantization_config")
    if quant:
        if quant.get("quant_method") != "fp8" or list(quant.get("weight_block_size", [128, 128])) != [128, 128]:
            raise ConfigError(f"quantization_config={quant}: only fp8 with 128x128 weight blocks is supported")
        kw["fp8_weights"] = True
        kw["scale_fmt"] = quant.get("scale_fmt")
    return ModelArgs(**kw)


def _rope_from_hf(raw: dict) -> dict:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return {"rope_theta": theta, "rope_factor": 1.0}
    if kind != "yarn":
        raise ConfigError(f"rope type {kind!r}: only yarn (or none) is supported")
    if rope.get("factor") is None:
        raise ConfigError(f"rope type yarn without a factor: {rope}")
    factor = rope["factor"]
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if rope.get("attention_factor") is not None:
        rope_mscale = rope["attention_factor"]
    elif mscale and mscale_all_dim:
        rope_mscale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        rope_mscale = yarn_mscale(factor, 1.0)
    return {
        "rope_theta": theta,
        "rope_factor": factor,
        # absent, transformers takes the pretraining length to be max_position_embeddings
        "original_seq_len": rope.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 4096),
        "beta_fast": rope.get("beta_fast") or 32,
        "beta_slow": rope.get("beta_slow") or 1,
        "mscale": mscale_all_dim or 0.0,
        "rope_mscale": rope_mscale,
    }
