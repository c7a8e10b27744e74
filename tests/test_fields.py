"""vLLM's and SGLang's request fields (issue 31), through the real `openai` client (`extra_body`) against one server
of world size 1, and on the batch job's lines: each shows its effect, checked against the batch job's token ids and
the tokenizer's own decoding. On the test checkpoint the greedy reply to "What?" ends with eos after 26 tokens (of
the 40 asked for); with ignore_eos, eos is an ordinary token, whose text (a special token's) skip_special_tokens
hides."""

import json
import shutil
import subprocess
import sys

import openai
import pytest
from processes import ENV, REPO
from test_server import MODEL, OPTIONS, Server

from tp_infer.tokenizer import ChatTokenizer

EOS, EOS_TEXT = 1, "<｜end▁of▁sentence｜>"
QUESTION = [{"role": "user", "content": "What?"}]
LIMIT = 40  # max_tokens of every request here: longer than the greedy reply
# the test template with DeepSeek V3.1's switch: `thinking` opens a <think> block after the generation prompt
THINKING_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% if thinking %}{{ '<think>' }}{% endif %}{% endif %}"
)

# batch lines: (id, fields); each asks QUESTION with max_new_tokens LIMIT
LINES = {
    "greedy": {},
    "ignore_eos": {"ignore_eos": True},
    "min_tokens": {"min_tokens": 30},
    "stop_token_ids": {"stop_token_ids": None},  # set from the greedy reply
    "include_stop": {"stop_token_ids": None, "include_stop_str_in_output": True},
    "specials": {"skip_special_tokens": False, "ignore_eos": True},
    "specials_stop": {"skip_special_tokens": False, "include_stop_str_in_output": True},
    "top_k": {"temperature": 1.0, "top_k": 1, "seed": 5},
    "min_p": {"temperature": 1.0, "min_p": 1.0, "seed": 6},
    "thinking": {"chat_template_kwargs": {"thinking": True}},
    "user": {"user": "someone"},
    "repetition": {"repetition_penalty": 1.5},
    "bad_min_p": {"min_p": 2},
    "bad_min_tokens": {"min_tokens": LIMIT + 1},
}


@pytest.fixture(scope="module")
def ckpt(chat_ckpt, tmp_path_factory):
    """The chat checkpoint (world size 1) with the thinking template: without the kwarg it renders as before."""
    folder = tmp_path_factory.mktemp("fields") / "ckpt"
    shutil.copytree(chat_ckpt, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return folder


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return ChatTokenizer(ckpt)


def run_batch(ckpt, root, lines: list[dict]) -> dict:
    (root / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cmd = [sys.executable, "-m", "tp_infer.generate", "--ckpt-path", str(ckpt), *OPTIONS]
    cmd += ["--input-file", str(root / "in.jsonl"), "--output-file", str(root / "out.jsonl")]
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    return {r["id"]: r for r in map(json.loads, (root / "out.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def batch(ckpt, tokenizer, tmp_path_factory):
    """The batch job's records by id: the greedy reply first (its 5th token becomes the stop token id), then every
    field on a line of its own, and the prompt rendered with thinking as raw ids (the oracle of the kwarg)."""
    root = tmp_path_factory.mktemp("fields-batch")
    first = run_batch(ckpt, root, [{"id": "greedy", "messages": QUESTION, "max_new_tokens": LIMIT}])
    greedy = first["greedy"]["turns"][0]["token_ids"]
    lines = []
    for name, fields in LINES.items():
        fields = {k: [greedy[4]] if k == "stop_token_ids" else v for k, v in fields.items()}
        lines.append({"id": name, "messages": QUESTION, "max_new_tokens": LIMIT, **fields})
    thinking_ids, _ = tokenizer.with_template_kwargs({"thinking": True}).encode_chat(QUESTION)
    lines.append({"id": "thinking_ids", "prompt_token_ids": thinking_ids, "max_new_tokens": LIMIT})
    lines.append({"id": "kwargs_on_ids", "prompt_token_ids": [5, 6], "chat_template_kwargs": {"thinking": True}})
    lines.append({"id": "turns_thinking", "turns": ["What?"], "max_new_tokens": LIMIT, **LINES["thinking"]})
    (root / "out.jsonl").unlink()
    return run_batch(ckpt, root, lines)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(1, ckpt)
    yield s
    s.stop()


def reply(batch, name: str) -> dict:
    record = batch[name]
    assert record["error"] is None, record["error"]
    return record["turns"][0]


def chat(server, **extra):
    client = server.client(timeout=60)
    return client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=LIMIT, temperature=0, extra_body=extra or None
    )


# ---- the batch job's lines --------------------------------------------------------------------------------------
def test_batch_lines_take_the_fields(batch, tokenizer):
    greedy = reply(batch, "greedy")["token_ids"]
    assert greedy[-1] == EOS and len(greedy) < LIMIT, "the premise of these tests"
    assert EOS not in greedy[:-1]
    body = greedy[:-1]

    ignoring = reply(batch, "ignore_eos")
    assert len(ignoring["token_ids"]) == LIMIT and ignoring["finish_reason"] == "length"
    assert ignoring["token_ids"][: len(greedy)] == greedy, "eos generated, and generation went on"

    held = reply(batch, "min_tokens")["token_ids"]
    assert held[: len(body)] == body and EOS not in held[:30] and held[len(body)] != EOS
    assert len(held) > 30

    stop = reply(batch, "stop_token_ids")
    assert stop["token_ids"] == greedy[:5] and stop["finish_reason"] == "stop"
    assert stop["text"] == tokenizer.decode(greedy[:4])
    assert reply(batch, "include_stop")["text"] == tokenizer.decode(greedy[:5])

    specials = reply(batch, "specials")
    assert specials["token_ids"] == ignoring["token_ids"] and EOS_TEXT not in ignoring["text"]
    assert specials["text"] == tokenizer.decode(specials["token_ids"], skip_special_tokens=False)
    assert EOS_TEXT in specials["text"]
    assert reply(batch, "specials_stop")["text"] == tokenizer.decode(greedy, skip_special_tokens=False)
    assert reply(batch, "specials_stop")["text"].endswith(EOS_TEXT)
    assert EOS_TEXT not in reply(batch, "greedy")["text"]

    assert reply(batch, "top_k")["token_ids"] == greedy, "top_k 1 keeps the likeliest token only"
    assert reply(batch, "min_p")["token_ids"] == greedy, "min_p 1 keeps the likeliest token only"
    assert reply(batch, "user")["token_ids"] == greedy

    thinking = reply(batch, "thinking")
    assert thinking["prompt_tokens"] == reply(batch, "greedy")["prompt_tokens"] + len(tokenizer.encode("<think>"))
    assert thinking["token_ids"] == reply(batch, "thinking_ids")["token_ids"]
    assert reply(batch, "turns_thinking")["token_ids"] == thinking["token_ids"]

    assert reply(batch, "repetition")["token_ids"] != greedy

    assert "min_p" in batch["bad_min_p"]["error"] and not batch["bad_min_p"]["turns"]
    assert "min_tokens" in batch["bad_min_tokens"]["error"]
    assert "chat_template_kwargs" in batch["kwargs_on_ids"]["error"]


# ---- the server -------------------------------------------------------------------------------------------------
def test_server_greedy_reply_ends_early_as_the_batch_jobs(server, batch):
    answer = chat(server)
    greedy = reply(batch, "greedy")
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == len(greedy["token_ids"])
    assert answer.choices[0].message.content == greedy["text"]


def test_ignore_eos_generates_to_max_tokens(server, batch):
    answer = chat(server, ignore_eos=True)
    assert answer.usage.completion_tokens == LIMIT and answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == reply(batch, "ignore_eos")["text"]
    client = server.client(timeout=60)
    ids = [5, 6, 7]
    text = client.completions.create(model=MODEL, prompt=ids, max_tokens=LIMIT, temperature=0, extra_body={})
    ignoring = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=LIMIT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ignoring.usage.completion_tokens == LIMIT and ignoring.choices[0].text.startswith(text.choices[0].text)


def test_min_tokens_holds_back_end_of_sentence(server, batch):
    answer = chat(server, min_tokens=30)
    held = reply(batch, "min_tokens")
    assert answer.usage.completion_tokens == len(held["token_ids"]) > 30
    assert answer.choices[0].message.content == held["text"]
    # a stop string generated before min_tokens does not end the reply either
    text = reply(batch, "greedy")["text"]
    assert chat(server, stop=[text[5:8]]).usage.completion_tokens < 10
    late = chat(server, stop=[text[5:8]], min_tokens=30)
    assert late.usage.completion_tokens >= 30 and late.choices[0].message.content.startswith(text[:8])


def test_stop_token_ids_stop_and_include_stop_str_in_output_keeps_what_stopped(server, batch, tokenizer):
    stop_id = reply(batch, "greedy")["token_ids"][4]
    answer = chat(server, stop_token_ids=[stop_id])
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 5
    assert answer.choices[0].message.content == reply(batch, "stop_token_ids")["text"]
    kept = chat(server, stop_token_ids=[stop_id], include_stop_str_in_output=True)
    assert kept.choices[0].message.content == reply(batch, "include_stop")["text"]
    # a stop string: cut before it, or after it when kept
    text = reply(batch, "greedy")["text"]
    stop = text[5:8]
    assert stop and text.find(stop) == 5, "a stop string the greedy reply holds first at character 5"
    client = server.client(timeout=60)
    for keep, expected in ((False, text[:5]), (True, text[:8])):
        extra = {"include_stop_str_in_output": keep}
        for streamed in (False, True):
            got = client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                max_tokens=LIMIT,
                temperature=0,
                stop=[stop],
                stream=streamed,
                extra_body=extra,
            )
            if streamed:
                content = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
            else:
                content = got.choices[0].message.content
            assert content == expected, (keep, streamed)


def test_skip_special_tokens_false_shows_them(server, batch):
    assert EOS_TEXT not in chat(server, ignore_eos=True).choices[0].message.content
    shown = chat(server, ignore_eos=True, skip_special_tokens=False).choices[0].message.content
    assert shown == reply(batch, "specials")["text"] and EOS_TEXT in shown
    assert EOS_TEXT not in chat(server, skip_special_tokens=False).choices[0].message.content, "the stop token"
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=LIMIT,
        temperature=0,
        stream=True,
        extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True},
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply(batch, "specials_stop")["text"]
    )


def test_top_k_and_min_p_sample_only_inside_their_set(server, batch):
    """top_k 1 and min_p 1 leave the likeliest token alone: sampled at temperature 1 with any seed, the greedy reply
    (the sampler's sets over many draws are tested in test_sampling)."""
    greedy = reply(batch, "greedy")["text"]
    for seed in (1, 2, 3):
        for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_k": -1, "min_p": 1.0}):
            client = server.client(timeout=60)
            answer = client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=LIMIT, temperature=1.0, seed=seed, extra_body=extra
            )
            assert answer.choices[0].message.content == greedy, (seed, extra)


def test_chat_template_kwargs_reach_the_template(server, batch):
    plain, thinking = chat(server), chat(server, chat_template_kwargs={"thinking": True})
    assert thinking.usage.prompt_tokens == reply(batch, "thinking")["prompt_tokens"] > plain.usage.prompt_tokens
    assert thinking.choices[0].message.content == reply(batch, "thinking")["text"]
    assert chat(server, chat_template_kwargs={"thinking": False}).usage.prompt_tokens == plain.usage.prompt_tokens


def test_repetition_penalty_and_user(server, batch):
    assert chat(server, repetition_penalty=1.5).choices[0].message.content == reply(batch, "repetition")["text"]
    assert chat(server, user="someone").choices[0].message.content == reply(batch, "greedy")["text"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"min_p": 2}, "min_p"),
        ({"min_tokens": LIMIT + 1}, "min_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"use_beam_search": True}, "use_beam_search"),
    ],
)
def test_values_and_fields_it_cannot_honour_are_refused_by_name(server, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, **extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.body["message"]
