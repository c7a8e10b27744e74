"""Tiny random DeepSeek checkpoints written by transformers itself (the independent oracle), with weights scaled
so that activations and logits are O(1) and every routing decision matters."""

import math
from pathlib import Path

import torch

YARN_V3 = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
YARN_V2 = {**YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    v_head_dim=16,
    qk_nope_head_dim=32,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
)

INDEX_TOPK = 8
INDEXER = dict(index_n_heads=64, index_head_dim=32, index_topk=INDEX_TOPK)


def hf_model(kind: str, seed: int = 0):
    """kind "v3": q_lora, sigmoid routing with bias, groups; "v2": plain wq, softmax, group-limited greedy; "v32":
    v3 with DeepSeek Sparse Attention, its indexer keeping INDEX_TOPK positions (so that sparsity matters from the
    ninth token on)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "v32":
        config = transformers.DeepseekV32Config(
            **COMMON, q_lora_rank=48, routed_scaling_factor=2.5, rope_parameters=YARN_V3, **INDEXER
        )
        model = transformers.DeepseekV32ForCausalLM(config)
    elif kind == "v3":
        config = transformers.DeepseekV3Config(
            **COMMON, q_lora_rank=48, routed_scaling_factor=2.5, rope_parameters=YARN_V3
        )
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        config = transformers.DeepseekV2Config(
            **COMMON,
            q_lora_rank=None,
            routed_scaling_factor=1.5,
            topk_method="group_limited_greedy",
            rope_parameters=YARN_V2,
        )
        model = transformers.DeepseekV2ForCausalLM(config)
    scale_weights(model)
    return model.float().eval()


def scale_weights(model) -> None:
    """Norms near 1, a real routing bias, unit embeddings, 1/sqrt(fan-in) matrices: activations stay O(1)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "norm" in name:
                t.uniform_(0.5, 1.5)
            elif "e_score_correction_bias" in name:
                t.uniform_(-0.2, 0.2)
            elif "embed_tokens" in name:
                t.normal_(0, 1.0)
            elif t.dim() >= 2:
                t.normal_(0, 1 / math.sqrt(t.shape[-1]))


def write_hf_checkpoint(kind: str, path: Path, seed: int = 0) -> Path:
    hf_model(kind, seed).save_pretrained(path, max_shard_size="300KB")
    return path


# DeepSeek-V3's chat format, written for these tests: bos, system prompts, then <｜User｜>u<｜Assistant｜>a<eos>...
DEEPSEEK_V3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAT_VOCAB = 320


def write_tokenizer(path: Path, vocab_size: int = CHAT_VOCAB) -> None:
    """A byte-level BPE with DeepSeek's special tokens (ids 0-3) and the chat template, as a checkpoint ships them."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["Hello there, how are you today?", "My name is Ada and I live in Paris.", "The code is 4821."] * 20
    tokenizer.train_from_iterator(text, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "chat_template": DEEPSEEK_V3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))


def write_chat_checkpoint(path: Path, seed: int = 0) -> Path:
    """The v3 variant with a vocabulary of CHAT_VOCAB and a tokenizer: a whole checkpoint, as the front end takes."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        **{**COMMON, "vocab_size": CHAT_VOCAB}, q_lora_rank=48, routed_scaling_factor=2.5, rope_parameters=YARN_V3
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    scale_weights(model)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


V32_CHAT_VOCAB = CHAT_VOCAB + 4  # the tokenizer's and <think>, </think> (ids CHAT_VOCAB, CHAT_VOCAB + 1), padded to 4


def write_dsv32_tokenizer(path: Path) -> Path:
    """tests' tokenizer as a DeepSeek-V3.2 checkpoint ships it: no chat template (the encoder renders), and <think>,
    </think> single tokens; a folder without a config.json gets one saying model_type deepseek_v32."""
    import json

    from tokenizers import AddedToken, Tokenizer

    write_tokenizer(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tokenizer.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    if not (path / "config.json").exists():
        (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    return path


def write_v32_chat_checkpoint(path: Path, seed: int = 0) -> Path:
    """The v32 variant with the V3.2 tokenizer folder: a whole V3.2 checkpoint, as the front end takes."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV32Config(
        **{**COMMON, "vocab_size": V32_CHAT_VOCAB},
        q_lora_rank=48,
        routed_scaling_factor=2.5,
        rope_parameters=YARN_V3,
        **INDEXER,
    )
    model = transformers.DeepseekV32ForCausalLM(config)
    scale_weights(model)
    model.save_pretrained(path)
    return write_dsv32_tokenizer(path)
