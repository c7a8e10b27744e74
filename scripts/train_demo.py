"""Train the demo model: a small DeepSeek-V3 (MLA with q_lora, YaRN, MoE with sigmoid routing and a dense first
layer) that answers questions about facts stated earlier in the conversation, with its own byte-level BPE tokenizer
and a DeepSeek-format chat template. Writes a Hugging Face folder that loads like a real DeepSeek checkpoint.

python scripts/train_demo.py [--out demo/model] [--minutes 24] [--threads 2]    # --threads 1 on a busy machine

Training runs on the CPU in fp32 for the given wall-clock budget on conversations generated on the fly (the loss
counts assistant tokens only); the weights are saved in bf16, reloaded through transformers' Auto classes and
checked on held-out conversations (another seed) with and without their history.
"""

import functools
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import click
import jinja2
import torch
import transformers
from demo_data import held_out_conversations, make_conversation, to_messages
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4

# DeepSeek-V3's format: bos, the system prompts (joined by blank lines), then <｜User｜>{u}<｜Assistant｜>{a}<eos> per
# turn, and <｜Assistant｜> to ask for a reply. One line: newlines after {{ }} would be part of the output.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages if message['role'] == 'system' %}"
    "{% if not loop.first %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' %}{% endif %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# DeepSeek's pre-tokenizer, except that digits are split one by one (DeepSeek groups up to three).
WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HELD_OUT_SEED = 1234


@functools.cache
def chat_template() -> jinja2.Template:
    """The chat template compiled as transformers compiles it (sandboxed Jinja2, trim_blocks and lstrip_blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE)


def render(messages: list[dict], add_generation_prompt: bool) -> str:
    return chat_template().render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS
    )


def train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE over the text of generated conversations, with DeepSeek's special tokens at ids 0-4."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.Split(Regex(WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    rng = random.Random(f"tokenizer {seed}")
    texts = []
    for _ in range(20000):
        conversation = make_conversation(rng)
        texts += [m["content"] for m in to_messages(conversation)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_config() -> dict:
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "added_tokens_decoder": {str(i): {"content": t, **special} for i, t in enumerate(SPECIAL_TOKENS)},
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def encode_conversation(tokenizer: Tokenizer, conversation: dict) -> tuple[list[int], list[int]]:
    """Token ids of the whole rendered conversation, and labels: the ids of assistant tokens (each reply and its
    eos), -100 elsewhere."""
    ids = tokenizer.encode(render(to_messages(conversation), False), add_special_tokens=False).ids
    assistant, eos = tokenizer.token_to_id(ASSISTANT), tokenizer.token_to_id(EOS)
    labels, in_reply = [], False
    for token in ids:
        labels.append(token if in_reply else -100)
        if token == assistant:
            in_reply = True
        elif token == eos:
            in_reply = False
    return ids, labels


def make_model(vocab_size: int) -> PreTrainedModel:
    config = transformers.DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    return transformers.DeepseekV3ForCausalLM(config)


class ExpertBalancer:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): after each step, nudge each router's selection bias up for
    under-loaded experts and down for over-loaded ones."""

    def __init__(self, model: PreTrainedModel, rate: float):
        self.rate = rate
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.loads = [torch.zeros_like(r.e_score_correction_bias) for r in self.routers]
        for router, load in zip(self.routers, self.loads, strict=True):
            router.register_forward_hook(self._counter(load))

    @staticmethod
    def _counter(load: torch.Tensor):
        def hook(module, inputs, outputs) -> None:
            load.add_(torch.bincount(outputs[2].flatten(), minlength=load.numel()).to(load.dtype))

        return hook

    @torch.no_grad()
    def step(self) -> float:
        """Update the biases; returns the worst expert load relative to the mean (1.0 is perfect balance)."""
        worst = 0.0
        for router, load in zip(self.routers, self.loads, strict=True):
            bias = router.e_score_correction_bias
            bias += self.rate * torch.sign(load.mean() - load)
            bias -= bias.mean()  # routing ignores a shift common to all experts: keep the biases centred
            worst = max(worst, (load.max() / load.mean()).item())
            load.zero_()
        return worst


def batches(tokenizer: Tokenizer, seed: int, batch_size: int, facts: Callable[[], tuple[int, int]], pool: int = 32):
    """Endless batches of right-padded conversations (pad positions have label -100), with as many facts as
    `facts()` says at the time; each pool of batches is drawn together and sorted by length, so that little of a
    batch is padding."""
    rng = random.Random(f"train {seed}")  # held-out conversations come from integer seeds: never the same
    pad = tokenizer.token_to_id(PAD)
    while True:
        n_facts = facts()
        pairs = sorted(
            (encode_conversation(tokenizer, make_conversation(rng, n_facts)) for _ in range(batch_size * pool)),
            key=lambda pair: len(pair[0]),
        )
        chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            yield ids, labels


def learning_rate(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to floor * peak, over progress in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (floor + (1 - floor) * cosine)


def assistant_loss(model: PreTrainedModel, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at the positions whose next token is an assistant token: only those go through
    the output head."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets >= 0
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep])


def reply_spans(labels: list[int]) -> list[range]:
    """Positions of each assistant reply (its tokens and eos) in a conversation, in turn order."""
    spans, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label >= 0 and start is None:
            start = i
        elif label < 0 and start is not None:
            spans.append(range(start, i))
            start = None
    return spans


@torch.no_grad()
def probe(model: PreTrainedModel, tokenizer: Tokenizer, conversations: list[dict]) -> float:
    """Teacher-forced share of recall answers whose every token is the model's top choice: a quick measure of
    recall during training."""
    model.eval()
    right = total = 0
    for conversation in conversations:
        ids, labels = encode_conversation(tokenizer, conversation)
        predicted = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        spans = reply_spans(labels)
        for t in conversation["questions"]:
            total += 1
            right += all(predicted[i - 1] == ids[i] for i in spans[t])
    model.train()
    return right / total


def train(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    minutes: float,
    seed: int,
    lr: float,
    batch_size: int,
    short_share: float,
) -> float:
    """AdamW on assistant tokens until the wall-clock budget is spent, on chats with 1-2 facts for the first
    `short_share` of it (copying is learnt much sooner in short chats); returns the mean loss of the last steps."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    balancer = ExpertBalancer(model, rate=1e-3)
    model.train()
    budget, start = minutes * 60, time.time()
    recent: list[float] = []
    probe_set = held_out_conversations(32, HELD_OUT_SEED + 1)
    tokens = 0

    def progress() -> float:
        return (time.time() - start) / budget

    def facts() -> tuple[int, int]:
        return (1, 2) if progress() < short_share else (3, 6)

    for step, (ids, labels) in enumerate(batches(tokenizer, seed, batch_size, facts), start=1):
        if progress() >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress(), lr)
        loss = assistant_loss(model, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        imbalance = balancer.step()
        tokens += ids.numel()
        recent = [*recent[-49:], loss.item()]
        if step % 100 == 0:
            elapsed = time.time() - start
            print(
                f"step {step:5d}  {elapsed / 60:5.1f} min  loss {sum(recent) / len(recent):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {tokens / elapsed:6.0f} tok/s  "
                f"max expert load {imbalance:.2f}x mean  probe recall {probe(model, tokenizer, probe_set):.0%}",
                flush=True,
            )
    return sum(recent) / len(recent)


def save(model: PreTrainedModel, tokenizer: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@torch.no_grad()
def reply(model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """Greedy reply through transformers' own chat-template path."""
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = torch.tensor([ids["input_ids"]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    return hf_tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def recall(
    model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase, conversations: list[dict]
) -> tuple[float, float, int]:
    """Exact-match accuracy of the answers to recall questions: chatting turn by turn with the model's own replies
    in the history, and asking each question with no history at all."""
    with_history = without = total = 0
    for conversation in conversations:
        chat = dict(conversation, turns=[dict(turn) for turn in conversation["turns"]])
        for t, turn in enumerate(conversation["turns"]):
            chat["turns"][t]["assistant"] = reply(model, hf_tokenizer, to_messages(chat, upto=t))
            if t in conversation["questions"]:
                total += 1
                with_history += chat["turns"][t]["assistant"] == turn["assistant"]
                alone = reply(model, hf_tokenizer, to_messages(conversation, upto=t, history=False))
                without += alone == turn["assistant"]
    return with_history / total, without / total, total


def check_template(hf_tokenizer: PreTrainedTokenizerBase, tokenizer: Tokenizer, conversations: list[dict]) -> None:
    """transformers' apply_chat_template must give the very ids training used."""
    for conversation in conversations:
        messages = to_messages(conversation)
        theirs = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        ours = encode_conversation(tokenizer, conversation)[0]
        if list(theirs) != ours:
            raise click.ClickException("transformers renders the chat template differently from training")


@click.command()
@click.option("--out", default="demo/model", show_default=True, type=click.Path(file_okay=False))
@click.option("--minutes", default=24.0, show_default=True, help="Wall-clock training budget.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weights, tokenizer and training chats.")
@click.option("--lr", default=5e-4, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", default=8, show_default=True, help="Conversations per step.")
@click.option("--vocab-size", default=768, show_default=True, help="BPE vocabulary size (with special tokens).")
@click.option("--short-share", default=0.2, show_default=True, help="Share of the budget spent on 1-2 fact chats.")
@click.option("--threads", default=2, show_default=True, help="CPU threads (1 runs faster on a busy machine).")
@click.option("--eval-conversations", default=200, show_default=True, help="Held-out conversations to check.")
def main(
    out: str,
    minutes: float,
    seed: int,
    lr: float,
    batch_size: int,
    vocab_size: int,
    short_share: float,
    threads: int,
    eval_conversations: int,
) -> None:
    """Train the demo model and write it as a Hugging Face folder."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.time()
    tokenizer = train_tokenizer(vocab_size, seed)
    # the embedding is padded to a multiple of 64 rows so that it splits evenly over tensor-parallel ranks
    model = make_model(64 * math.ceil(tokenizer.get_vocab_size() / 64))
    params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; model: {params / 1e6:.2f}M parameters", flush=True)
    loss = train(model, tokenizer, minutes, seed, lr, batch_size, short_share)
    out_dir = Path(out)
    save(model, tokenizer, out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"trained in {(time.time() - start) / 60:.1f} min, final loss {loss:.4f}; {out_dir}: {size / 2**20:.2f} MiB")

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    conversations = held_out_conversations(eval_conversations, HELD_OUT_SEED)
    check_template(hf_tokenizer, tokenizer, conversations)
    with_history, without, questions = recall(model, hf_tokenizer, conversations)
    print(
        f"held-out recall, {questions} questions in {eval_conversations} conversations (seed {HELD_OUT_SEED}): "
        f"{with_history:.1%} with history, {without:.1%} with the history withheld"
    )


if __name__ == "__main__":
    main()
