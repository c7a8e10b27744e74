"""Issue 28, rendering: a conversation's ids and turn starts come from one rendering of the template (plus a few
checks), not one rendering a user message, with the ids the old way gave; a template whose output cannot be located
falls back to rendering each prefix (short conversations) or to one turn."""

import random
from itertools import pairwise
from pathlib import Path

import pytest
from checkpoints import DEEPSEEK_V3_TEMPLATE, write_tokenizer

from tp_infer.chat import ReplyMemory, encode_messages
from tp_infer.tokenizer import EXACT_POINTS, ChatTokenizer

CHECKS = 4  # renderings to check the cuts of a conversation of users and assistants after a system prompt

DEMO = Path(__file__).resolve().parent.parent / "demo" / "model"

# the template a DeepSeek-V3 checkpoint ships, in the parts these conversations reach (system prompts gathered first
# with `loop.first` and a namespace, tool outputs, raise_exception)
SHIPPED_V3 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}"
    "{%- elif message['role'] == 'assistant' %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}"
    "{%- set ns.is_tool = false -%}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- elif message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
# prefix-stable, but it looks one message ahead (loop.last): where it takes message i is not where message i starts
LOOKAHEAD = (
    "{{ bos_token }}{% for m in messages %}{% if loop.last %}{% endif %}"
    "{{ '<｜User｜>' if m['role'] == 'user' else '<｜Assistant｜>' }}"
    "{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
# iterates the messages again after writing them, without output
TRAILING_LOOP = DEEPSEEK_V3_TEMPLATE + "{% for m in messages %}{% endfor %}"
TEMPLATES = {"tests": DEEPSEEK_V3_TEMPLATE, "shipped": SHIPPED_V3, "lookahead": LOOKAHEAD, "trailing": TRAILING_LOOP}


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return folder


def tokenizer_with(folder: Path, name: str) -> ChatTokenizer:
    if name == "demo":
        return ChatTokenizer(DEMO)
    tokenizer = ChatTokenizer(folder)
    tokenizer.template = tokenizer._compile(TEMPLATES[name])
    return tokenizer


def old_encode_chat(tokenizer: ChatTokenizer, messages: list[dict], add_generation_prompt=True):
    """encode_chat as it was: each user message's prefix rendered on its own."""
    cuts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    texts = [tokenizer.render_prefix(messages[:i]) for i in cuts]
    full = tokenizer.render(messages, add_generation_prompt)
    chain = [*texts, full]
    if not all(b.startswith(a) for a, b in pairwise(chain)):
        return tokenizer.encode(full), [0]
    ids, starts = tokenizer.encode(chain[0]), []
    for a, b in pairwise(chain):
        starts.append(len(ids))
        ids += tokenizer.encode(b[len(a) :])
    return ids, starts or [0]


CONTENTS = ["Hello there,", "", "how are you today?", "My name is Ada", "<｜User｜>x", "a\nb", " The code is 4821."]


def conversations(seed: int, count: int, max_messages: int, roles=("user", "assistant")) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(CONTENTS)}] if rng.random() < 0.5 else []
        for k in range(rng.randrange(max_messages + 1)):
            role = roles[k % 2] if rng.random() < 0.85 else rng.choice(("user", "assistant", "system", "tool"))
            messages.append({"role": role, "content": rng.choice(CONTENTS)})
        out.append(messages)
    return out


@pytest.mark.parametrize("name", ["demo", *TEMPLATES])
def test_ids_and_turn_starts_equal_the_old_way(tokenizer_folder, name):
    """Including conversations the old way encoded whole (a system message late, a tool message)."""
    tokenizer = tokenizer_with(tokenizer_folder, name)
    whole = cut = 0
    for messages in conversations(1, 150, 12):
        if name == "demo" and any(m["role"] == "tool" for m in messages):
            continue  # the demo model's template refuses tool messages
        for add_generation_prompt in (True, False):
            expected = old_encode_chat(tokenizer, messages, add_generation_prompt)
            assert tokenizer.encode_chat(messages, add_generation_prompt) == expected, messages
            cut += len(expected[1]) > 1
            whole += expected[1] == [0] and any(m["role"] == "user" for m in messages[1:])
    assert cut > 50 and (whole > 5 or name == "lookahead"), "both kinds must be met for the comparison to mean a thing"


class CountingTemplate:
    """A compiled template that counts its renderings and the messages they were given."""

    def __init__(self, template):
        self.template, self.renders, self.messages = template, 0, 0

    def generate(self, **context):
        self.renders += 1
        self.messages += len(context["messages"])
        return self.template.generate(**context)


def work(tokenizer: ChatTokenizer, messages: list[dict]) -> tuple[int, int]:
    counting = tokenizer.template = CountingTemplate(tokenizer.template)
    try:
        tokenizer.encode_chat(messages)
    finally:
        tokenizer.template = counting.template
    return counting.renders, counting.messages


def alternating(n: int) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[k % 2], "content": f"message {k}"} for k in range(n)
    ]


@pytest.mark.parametrize("name", ["demo", "tests", "shipped"])
def test_rendering_work_is_linear_in_the_conversation(tokenizer_folder, name):
    tokenizer = tokenizer_with(tokenizer_folder, name)
    small, large = work(tokenizer, alternating(100)), work(tokenizer, alternating(10_000))
    assert small[0] == large[0] <= 1 + CHECKS, "renderings do not grow with the conversation"
    assert large[1] <= (1 + CHECKS) * 10_001, "nor does any rendering take more than the conversation"
    assert len(tokenizer.encode_chat(alternating(10_000))[1]) == 5000, "one turn a user message"


def test_a_template_that_cannot_be_located_renders_each_prefix_of_a_short_conversation(tokenizer_folder):
    tokenizer = tokenizer_with(tokenizer_folder, "lookahead")
    short = alternating(2 * EXACT_POINTS)
    assert work(tokenizer, short)[0] > EXACT_POINTS
    assert tokenizer.encode_chat(short) == old_encode_chat(tokenizer, short)
    long = alternating(2 * EXACT_POINTS + 2)
    renders, _ = work(tokenizer, long)
    assert renders <= 1 + CHECKS, "a long conversation is not rendered a prefix at a time"
    ids, starts = tokenizer.encode_chat(long)
    assert starts == [0] and ids == tokenizer.encode(tokenizer.render(long)), "encoded whole, as one turn"


def test_render_cuts_with_generation_prompts(tokenizer_folder):
    """Points before assistant messages take the generation prompt: chat.encode_messages's points."""
    tokenizer = tokenizer_with(tokenizer_folder, "tests")
    for messages in conversations(2, 60, 10):
        points = [(i, m["role"] == "assistant") for i, m in enumerate(messages) if m["role"] in ("user", "assistant")]
        full, ends = tokenizer.render_cuts(messages, points)
        texts = [tokenizer.render(messages[:i]) if g else tokenizer.render_prefix(messages[:i]) for i, g in points]
        if all(b.startswith(a) for a, b in pairwise([*texts, full])):
            assert ends == [len(t) for t in texts], messages
        else:
            assert ends is None, messages


def old_encode_messages(tokenizer: ChatTokenizer, messages: list[dict], memory: ReplyMemory, salt=None):
    """chat.encode_messages as it was: every point rendered on its own, every recall hashing the whole prompt."""
    points = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            points.append((tokenizer.render_prefix(messages[:i]), None))
        elif m["role"] == "assistant":
            points.append((tokenizer.render(messages[:i], add_generation_prompt=True), m["content"]))
    points.append((tokenizer.render(messages, add_generation_prompt=True), None))
    if not all(b[0].startswith(a[0]) for a, b in pairwise(points)):
        return tokenizer.encode_chat(messages)
    ids, starts, done, stop = [], [], "", None
    for text, reply in points:
        if not text.startswith(done):
            return tokenizer.encode_chat(messages)
        new = tokenizer.encode(text[len(done) :])
        if stop is not None and new[:1] == [stop]:
            new = new[1:]
        ids += new
        done, stop = text, None
        if reply is None:
            starts.append(len(ids))
            continue
        recalled = memory.recall(ids, reply, salt)
        if recalled is not None:
            ids += recalled
            done += reply
            stop = recalled[-1] if recalled and recalled[-1] in tokenizer.eos_token_ids else None
    return ids, starts[:-1] or [0]


@pytest.mark.parametrize("name", ["demo", "tests", "shipped"])
@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_encode_messages_with_remembered_replies_equals_the_old_way(tokenizer_folder, name, salt):
    """Replies remembered (as ids a re-tokenisation would not give, some ending in eos) for most assistant messages,
    under the salt or another one; the ids and starts equal those of rendering every point on its own."""
    tokenizer = tokenizer_with(tokenizer_folder, name)
    eos = tokenizer.eos_token_ids[0]
    rng = random.Random(3)
    recalled = 0
    for messages in conversations(4, 80, 10, roles=("user", "assistant")):
        if name == "demo" and any(m["role"] == "tool" for m in messages):
            continue
        memory = ReplyMemory()
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and rng.random() < 0.7:
                prompt = old_encode_messages(tokenizer, messages[:i], memory, salt)[0]
                reply = [*reversed(tokenizer.encode(m["content"])), *([eos] if rng.random() < 0.5 else [])]
                memory.remember(prompt, m["content"], reply, salt if rng.random() < 0.8 else "tenant-b")
        expected = old_encode_messages(tokenizer, messages, memory, salt)
        assert encode_messages(tokenizer, messages, memory, salt) == expected, messages
        recalled += expected != tokenizer.encode_chat(messages)
    assert recalled > 20, "remembered replies must change the ids for the comparison to mean something"


@pytest.mark.parametrize("name", ["demo", "shipped"])
def test_encode_messages_work_is_linear_in_the_conversation(tokenizer_folder, name):
    tokenizer = tokenizer_with(tokenizer_folder, name)
    counts = []
    for n in (100, 10_000):
        counting = tokenizer.template = CountingTemplate(tokenizer.template)
        try:
            encode_messages(tokenizer, alternating(n), ReplyMemory())
        finally:
            tokenizer.template = counting.template
        counts.append((counting.renders, counting.messages))
    assert counts[0][0] == counts[1][0] <= 2 * CHECKS and counts[1][1] <= 2 * CHECKS * 10_001


def test_special_token_text_in_a_message_is_encoded_as_the_special_token():
    """What the ChatTokenizer docstring says we do (issue 28's fact 9), so that a change of it is noticed."""
    tokenizer = ChatTokenizer(DEMO)
    assert tokenizer.encode("Hi<｜end▁of▁sentence｜><｜Assistant｜>") == [420, 1, 4]
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": "Hi<｜end▁of▁sentence｜><｜Assistant｜>"}])
    assert ids == [0, 3, 420, 1, 4, 4]
