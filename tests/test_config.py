"""Config loading: shipped reference JSONs, Hugging Face config.json (4.x and 5.x rope styles), world-size checks."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tp_infer.config import ConfigError, ModelArgs, load_config
from tp_infer.model.rope import rope_frequencies, yarn_correction_range

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = ["config_16B.json", "config_236B.json", "config_671B.json", "config_v3.1.json"]
SMALL = ["config_tiny.json", "config_bench.json"]

# The published DeepSeek-V3 config.json (transformers 4.x style: rope_scaling with "type").
HF_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "torch_dtype": "bfloat16",
}

# The published DeepSeek-V2-Lite config.json.
HF_V2_LITE = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "moe_layer_freq": 1,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
}

# The published DeepSeek-V2 (236B) config.json differs from V2-Lite in these fields.
HF_V2 = {
    **HF_V2_LITE,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 160,
    "n_group": 8,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "routed_scaling_factor": 16.0,
    "q_lora_rank": 1536,
}


def write_json(tmp_path: Path, data: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def v5_style(raw: dict) -> dict:
    """The same config as transformers 5.x saves it: rope_parameters with rope_type and rope_theta inside."""
    raw = dict(raw)
    rope = dict(raw.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = float(raw.pop("rope_theta"))
    raw["rope_parameters"] = rope
    return raw


@pytest.mark.parametrize("name", SHIPPED + SMALL)
def test_shipped_configs_load(name):
    args = load_config(CONFIGS / name)
    assert isinstance(args, ModelArgs)
    assert args.yarn and args.max_seq_len > args.original_seq_len  # YaRN on under both conventions
    for world_size in (1, 2, 4, 8) if name in SHIPPED else (1, 2, 4):
        args.check_world_size(world_size)


def test_published_values():
    lite, v2, v3, v31 = (load_config(CONFIGS / name) for name in SHIPPED)
    assert (lite.q_lora_rank, lite.score_func, lite.route_norm, lite.mscale) == (0, "softmax", False, 0.707)
    assert (lite.n_routed_experts, lite.n_shared_experts, lite.n_activated_experts) == (64, 2, 6)
    assert not lite.fp8_weights
    assert (v2.n_routed_experts, v2.n_expert_groups, v2.n_limited_groups, v2.route_scale) == (160, 8, 3, 16.0)
    assert (v2.score_func, v2.route_norm, v2.mscale, v2.q_lora_rank) == ("softmax", False, 0.707, 1536)
    assert (v3.score_func, v3.route_norm, v3.route_scale, v3.fp8_weights) == ("sigmoid", True, 2.5, True)
    assert (v3.vocab_size, v3.n_layers, v3.n_dense_layers, v3.n_routed_experts) == (129280, 61, 3, 256)
    assert (v3.n_expert_groups, v3.n_limited_groups, v3.mscale, v3.scale_fmt) == (8, 4, 1.0, None)
    assert v3.dtype == "bf16"  # compute dtype; the reference "dtype" names the weights on disk
    assert v31 == replace(v3, scale_fmt="ue8m0")
    for args in (lite, v2, v3):
        assert (args.rope_factor, args.original_seq_len, args.beta_fast, args.beta_slow) == (40, 4096, 32, 1)


def test_small_configs_shape():
    tiny = load_config(CONFIGS / "config_tiny.json")
    assert (tiny.vocab_size, tiny.dim, tiny.n_layers, tiny.n_heads, tiny.n_routed_experts) == (512, 128, 3, 4, 8)
    assert (tiny.max_seq_len, tiny.original_seq_len, tiny.rope_factor) == (512, 128, 4)
    assert not tiny.fp8_weights
    bench = load_config(CONFIGS / "config_bench.json")
    assert (bench.dim, bench.n_layers, bench.vocab_size, bench.max_seq_len) == (1024, 8, 32000, 4096)
    assert (bench.score_func, bench.fp8_weights) == ("sigmoid", False)


def test_yarn_and_softmax_scale():
    v3 = load_config(CONFIGS / "config_671B.json")
    assert yarn_correction_range(v3) == (10, 23)
    assert v3.softmax_scale == pytest.approx(0.13523378, abs=1e-7)
    lite = load_config(CONFIGS / "config_16B.json")
    assert yarn_correction_range(lite) == (10, 23)
    assert lite.softmax_scale == pytest.approx(0.11472139, abs=1e-7)
    no_yarn = replace(v3, rope_factor=1.0)
    assert no_yarn.softmax_scale == pytest.approx(192**-0.5)


def test_runtime_overrides():
    path = CONFIGS / "config_671B.json"
    base = load_config(path)
    args = load_config(path, max_seq_len=2048, attn_impl="naive", dtype="fp32", max_batch_size=None)
    assert (args.max_seq_len, args.attn_impl, args.dtype, args.max_batch_size) == (2048, "naive", "fp32", 8)
    assert args.fp8_weights  # weights on disk stay fp8 whatever the compute dtype
    assert replace(args, max_seq_len=base.max_seq_len, attn_impl=base.attn_impl, dtype=base.dtype) == base


def test_hf_v3_matches_reference(tmp_path):
    v4 = load_config(write_json(tmp_path, HF_V3, "v4.json"))
    v5 = load_config(write_json(tmp_path, v5_style(HF_V3), "v5.json"))
    assert v4 == v5
    assert v4 == load_config(CONFIGS / "config_671B.json")
    assert v4.fp8_weights and v4.rope_mscale == 1.0
    v31 = {**HF_V3, "quantization_config": {**HF_V3["quantization_config"], "scale_fmt": "ue8m0"}}
    assert load_config(write_json(tmp_path, v31, "v31.json")) == load_config(CONFIGS / "config_v3.1.json")


def test_hf_v32_matches_reference(tmp_path):
    """DeepSeek-V3.2's config.json: V3.1's, model_type deepseek_v32 and the indexer's three fields."""
    v31 = {**HF_V3, "quantization_config": {**HF_V3["quantization_config"], "scale_fmt": "ue8m0"}}
    v32 = {**v31, "model_type": "deepseek_v32", "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    args = load_config(write_json(tmp_path, v32, "v32.json"))
    assert args == load_config(CONFIGS / "config_v3.2.json")
    assert args.sparse and args.model_type == "deepseek_v32"
    assert not load_config(write_json(tmp_path, {**v31, "index_topk": 2048}, "v3.json")).sparse, "V3 ignores them"
    with pytest.raises(ConfigError, match="q_lora_rank"):
        load_config(write_json(tmp_path, {**v32, "q_lora_rank": None}, "bad.json"))


@pytest.mark.parametrize(("raw", "reference"), [(HF_V2_LITE, "config_16B.json"), (HF_V2, "config_236B.json")])
def test_hf_v2_matches_reference(tmp_path, raw, reference):
    args = load_config(write_json(tmp_path, raw))
    assert args == load_config(write_json(tmp_path, v5_style(raw), "v5.json"))
    assert args == load_config(CONFIGS / reference)
    assert (args.score_func, args.route_norm, args.fp8_weights) == ("softmax", False, False)


def test_hf_details(tmp_path):
    assert load_config(write_json(tmp_path, HF_V2_LITE)).q_lora_rank == 0  # q_lora_rank null
    assert load_config(write_json(tmp_path, {**HF_V3, "q_lora_rank": None})).q_lora_rank == 0
    lite_grouped = {**HF_V2_LITE, "n_group": 4, "topk_group": 2}  # greedy top-k ignores the groups
    assert load_config(write_json(tmp_path, lite_grouped)).n_expert_groups == 1
    v2 = load_config(write_json(tmp_path, HF_V2))
    assert (v2.n_expert_groups, v2.n_limited_groups) == (8, 3)
    plain = {k: v for k, v in HF_V3.items() if k not in ("rope_scaling", "quantization_config")}
    args = load_config(write_json(tmp_path, plain))
    assert not args.yarn and not args.fp8_weights and args.softmax_scale == pytest.approx(192**-0.5)
    # without original_max_position_embeddings transformers takes max_position_embeddings
    rope = {k: v for k, v in HF_V3["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert load_config(write_json(tmp_path, {**HF_V3, "rope_scaling": rope})).original_seq_len == 163840


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "quantization_config"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_scaling": {"type": "yarn"}}, "factor"),
    ],
)
def test_hf_refusals(tmp_path, change, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_config(write_json(tmp_path, {**HF_V3, **change}))


def test_transformers_v3_config_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    rope = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    hf = transformers.DeepseekV3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
        rope_scaling=rope,
    )
    hf.save_pretrained(tmp_path)
    args = load_config(tmp_path / "config.json")
    tiny = load_config(CONFIGS / "config_tiny.json")
    # the saved HF config describes the tiny model; max_seq_len is a runtime option
    assert args == replace(tiny, max_seq_len=args.max_seq_len)
    assert args.score_func == "sigmoid" and args.route_norm and not args.fp8_weights

    # our YaRN frequencies, cos/sin factor and softmax scale agree with transformers'
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    rope_hf = transformers.DeepseekV3Config.from_pretrained(tmp_path)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](rope_hf, "cpu")
    torch.testing.assert_close(rope_frequencies(args), inv_freq.float(), rtol=1e-6, atol=0)
    assert args.rope_mscale == pytest.approx(attention_factor)
    assert args.softmax_scale == pytest.approx(yarn_apply_mscale(rope_hf.rope_parameters, args.qk_head_dim**-0.5))


def test_transformers_v2_config_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    hf.save_pretrained(tmp_path)
    args = load_config(tmp_path / "config.json")
    assert (args.score_func, args.route_norm, args.fp8_weights, args.q_lora_rank) == ("softmax", False, False, 0)
    assert (args.n_expert_groups, args.n_limited_groups, args.n_activated_experts) == (4, 2, 2)
    assert (args.dim, args.n_heads, args.qk_rope_head_dim, args.yarn) == (128, 4, 16, False)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_heads", 6), ("vocab_size", 510), ("inter_dim", 258), ("n_routed_experts", 6), ("moe_inter_dim", 66)],
)
def test_check_world_size_names_the_field(field, value):
    args = replace(load_config(CONFIGS / "config_tiny.json"), **{field: value})
    args.check_world_size(1)
    with pytest.raises(ConfigError, match=rf"{field}={value} is not divisible .* 4"):
        args.check_world_size(4)


def test_unknown_reference_field(tmp_path):
    raw = json.loads((CONFIGS / "config_tiny.json").read_text())
    with pytest.raises(ConfigError, match="n_experts"):
        load_config(write_json(tmp_path, {**raw, "n_experts": 8}))
    with pytest.raises(ConfigError, match="fp8_weights"):  # set through "dtype", not directly
        load_config(write_json(tmp_path, {**raw, "fp8_weights": True}))
    with pytest.raises(ConfigError, match="dtype"):
        load_config(write_json(tmp_path, {**raw, "dtype": "fp16"}))


def test_bad_runtime_options():
    path = CONFIGS / "config_tiny.json"
    with pytest.raises(ConfigError, match="attn_impl"):
        load_config(path, attn_impl="flash")
    with pytest.raises(ConfigError, match="dtype"):
        load_config(path, dtype="fp8")
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_config(path, max_seq_len=0)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_model_type_names_the_architecture():
    """What /model_info tells a gateway: V2's softmax routing, V3's sigmoid, V3.2's indexer."""
    assert load_config("configs/config_16B.json").model_type == "deepseek_v2"
    assert load_config("configs/config_671B.json").model_type == "deepseek_v3"
    assert load_config("configs/config_v3.2.json").model_type == "deepseek_v32"
