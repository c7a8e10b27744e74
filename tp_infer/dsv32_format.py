"""DeepSeek-V3.2's chat format. V3.2 checkpoints ship no Jinja chat template: DeepSeek publishes a Python encoder
instead (encoding/encoding_dsv32.py in the Hugging Face repository deepseek-ai/DeepSeek-V3.2, with a test case that
tests/data/dsv32 holds). This module renders what that encoder renders, written from its rules:

    <｜begin▁of▁sentence｜>SYSTEM[\\n\\n## Tools ... (the tools, in DSML)]
    <｜User｜>USER<｜Assistant｜></think>REPLY<｜end▁of▁sentence｜>                 (an earlier turn)
    <｜User｜>USER<｜Assistant｜><think>REASONING</think>REPLY<｜end▁of▁sentence｜>  (the last turn)

In thinking mode the last user message opens the reply with <think> and the replies after it keep their reasoning;
every earlier user message closes the reasoning at once (</think>) and its reply is written without the reasoning it
had. In chat mode every user message is followed by </think>. A reply's tool calls follow its content as a
<｜DSML｜function_calls> block; their results follow the reply as <function_results>...</function_results>, and the next
reply opens after them with \\n\\n<think> or \\n\\n</think> by the same rule.

So, with DeepSeek's default (drop_thinking), rendering a thinking conversation again after a new user message
rewrites the previous turn: its <think> becomes </think> and its reasoning goes. With drop_thinking false every turn is
written as it was generated, <think>, reasoning and all: each prompt is then the previous prompt, its reply and the
new message, and a cache can reuse all of it. That is an option of ours: DeepSeek's encoder takes a drop_thinking
flag too, but it only strips reasoning it would not write anyway (it writes none before the last user message).

Beyond the encoder, for the messages this project passes (role and content only): an assistant message without
reasoning_content whose content holds </think> is a reply as generated in thinking mode, its reasoning before the
first </think>; and a reply with neither reasoning nor tool calls after the last user message (a reply stopped before
</think>, or from chat mode) is written with empty reasoning where the encoder would refuse it."""

import json
from dataclasses import dataclass

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to \
the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think}...thinking about results{end_think}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
DEVELOPER_SUFFIX = "\n\n# The user's message is: "
USER_ROLES = ("user", "developer")  # the roles that open a reply
KWARGS = {  # the chat_template_kwargs this format takes, all booleans
    "thinking": "thinking mode (default false: chat)",
    "enable_thinking": "the same, as vLLM also accepts it",
    "drop_thinking": "drop the reasoning of earlier turns (default true, as DeepSeek's encoder)",
}


class EncodingError(ValueError):
    """A conversation or option this format cannot render; the message names the culprit."""


@dataclass(frozen=True)
class Dsv32Options:
    """thinking: thinking mode (DeepSeek's thinking_mode "thinking"), else chat. drop_thinking: DeepSeek's default,
    earlier turns without their reasoning; false writes every turn as it was generated."""

    thinking: bool = False
    drop_thinking: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: dict | None) -> "Dsv32Options":
        """From a request's chat_template_kwargs ({"thinking": true} as vLLM and SGLang take it for V3.2)."""
        kwargs = kwargs or {}
        for key, value in kwargs.items():
            if key not in KWARGS:
                raise EncodingError(
                    f"chat_template_kwargs: DeepSeek-V3.2's chat format takes {', '.join(KWARGS)}, not {key!r}"
                )
            if not isinstance(value, bool):
                raise EncodingError(f"chat_template_kwargs: {key} must be true or false, got {value!r}")
        thinking = kwargs.get("thinking", False) or kwargs.get("enable_thinking", False)
        return cls(thinking=thinking, drop_thinking=kwargs.get("drop_thinking", True))


def to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def render(
    messages: list[dict], options: Dsv32Options, add_generation_prompt: bool = True, add_bos: bool = True
) -> str:
    """The conversation as text. Messages are OpenAI-style dicts: role (system, developer, user, assistant, tool),
    content, and as the encoder reads them tools and response_format (system, developer), reasoning_content and
    tool_calls (assistant). add_generation_prompt: what the last message leaves open for a reply
    (<｜Assistant｜><think> after a user message, say); DeepSeek's encoder always writes it."""
    return render_tracked(messages, options, add_generation_prompt, add_bos)[0]


def render_tracked(
    messages: list[dict], options: Dsv32Options, add_generation_prompt: bool = True, add_bos: bool = True
) -> tuple[str, list[int]]:
    """The text, and for each message i where its text begins: the length of the text of messages[:i] without the
    generation prompt. Where the conversation renders as a prefix of its continuation (chat mode; thinking mode
    without drop_thinking; one turn) that is render(messages[:i], add_generation_prompt=False)."""
    keep = options.thinking and not options.drop_thinking
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in USER_ROLES), default=-1)
    text, starts, opener = BOS if add_bos else "", [], ""
    for i in range(len(messages)):
        starts.append(len(text))
        # reasoning is open after a user message, tool results or a reply in thinking mode from the last user on
        thinks = options.thinking and (keep or i >= last_user)
        own, after = _message(i, messages, thinks)
        text += opener + own
        opener = after
    if add_generation_prompt:
        text += opener
    return text, starts


def _message(i: int, messages: list[dict], thinks: bool) -> tuple[str, str]:
    """Message i's text, and what it leaves for the reply that follows (written before the next message, or as the
    generation prompt)."""
    message = messages[i]
    role, content = message.get("role"), message.get("content")
    think = THINK_START if thinks else THINK_END
    if role == "system":
        return (content or "") + _extras(i, message), ""
    if role == "user":
        return USER + _text(i, content), ASSISTANT + think
    if role == "developer":
        if not content:
            raise EncodingError(f"message {i}: a developer message needs content")
        return USER + _extras(i, message) + DEVELOPER_SUFFIX + _text(i, content), ASSISTANT + think
    if role == "assistant":
        return _assistant(i, message, thinks), ""
    if role == "tool":
        return _tool_result(i, messages, think)
    raise EncodingError(f"message {i}: DeepSeek-V3.2's chat format has no role {role!r}")


def _text(i: int, content) -> str:
    if not isinstance(content, str):
        raise EncodingError(f"message {i}: content must be a string")
    return content


def _extras(i: int, message: dict) -> str:
    """A system or developer message's tools and response format."""
    text = ""
    if tools := message.get("tools"):
        text += "\n\n" + render_tools(i, tools)
    if response_format := message.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT.format(schema=to_json(response_format))
    return text


def render_tools(i: int, tools: list) -> str:
    """The tools block of a system prompt, from OpenAI's [{"type": "function", "function": {...}}, ...]."""
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools
    ):
        raise EncodingError(f"message {i}: tools must be a list of {{type: function, function: {{...}}}}")
    schemas = "\n".join(to_json(t["function"]) for t in tools)
    return TOOLS_TEMPLATE.format(dsml=DSML, think=THINK_START, end_think=THINK_END, schemas=schemas)


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: its reasoning_content, or what its content holds before the
    first </think> (a reply as generated in thinking mode)."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None and isinstance(content, str) and THINK_END in content:
        reasoning, content = content.split(THINK_END, 1)
    return reasoning or "", content


def _assistant(i: int, message: dict, with_reasoning: bool) -> str:
    reasoning, content = split_reasoning(message)
    if not isinstance(content, str) or not isinstance(reasoning, str):
        raise EncodingError(f"message {i}: an assistant's content and reasoning_content must be strings")
    calls = message.get("tool_calls") or []
    text = reasoning + THINK_END if with_reasoning else ""
    text += content
    if calls:
        invokes = "\n".join(_invoke(i, call) for call in calls)
        text += f"\n\n<{DSML}function_calls>\n{invokes}\n</{DSML}function_calls>"
    return text + EOS


def _invoke(i: int, call) -> str:
    """One tool call, from OpenAI's {"type": "function", "function": {"name", "arguments"}}: each argument a
    parameter, strings as they are, anything else as JSON."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise EncodingError(f"message {i}: each tool call needs function.name")
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise EncodingError(f"message {i}: tool call {function['name']!r}: arguments must be a JSON object")
    parameters = "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else to_json(value)}</{DSML}parameter>"
        for key, value in arguments.items()
    )
    return f'<{DSML}invoke name="{function["name"]}">\n{parameters}\n</{DSML}invoke>'


def _tool_result(i: int, messages: list[dict], think: str) -> tuple[str, str]:
    """A tool result: the k-th of the results that follow an assistant's tool calls. The first opens
    <function_results>, the last (one per call) closes it and leaves the reply's opening."""
    caller = i - 1
    while caller >= 0 and messages[caller].get("role") == "tool":
        caller -= 1
    calls = messages[caller].get("tool_calls") if caller >= 0 and messages[caller].get("role") == "assistant" else None
    order = i - caller
    if not calls or len(calls) < order:
        raise EncodingError(f"message {i}: a tool result needs an assistant message with as many tool_calls before it")
    result = f"\n<result>{_text(i, messages[i].get('content'))}</result>"
    text = ("\n\n<function_results>" if order == 1 else "") + result
    if order < len(calls):
        return text, ""
    return text + "\n</function_results>", "\n\n" + think
