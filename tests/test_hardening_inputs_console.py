"""Issue 28, the console: /load checks the whole file before using it; a file that is not a saved conversation
gets one line naming what is wrong, the prompt comes back, and the conversation in progress goes on."""

import json

from test_console import console

GOOD = {"messages": [], "token_ids": [0, 5, 6], "turn_starts": [0]}

# file name -> (content, words of the one-line refusal)
BAD_FILES = {
    "robot.json": (
        {**GOOD, "messages": [{"role": "robot", "content": "x"}]},
        "messages[0]: unknown role 'robot' (allowed: system, user, assistant, tool)",
    ),
    "starts.json": ({**GOOD, "turn_starts": ["x", "y"]}, "turn_starts[0] = 'x' must be an integer offset"),
    "backwards.json": ({**GOOD, "turn_starts": [2, 1]}, "turn_starts[1] = 1 must be an integer offset"),
    "beyond.json": ({**GOOD, "turn_starts": [4]}, "turn_starts[0] = 4 must be an integer offset into token_ids, in"),
    "ids.json": ({**GOOD, "token_ids": "0 5 6"}, "token_ids must be a list, got str"),
    "float-id.json": ({**GOOD, "token_ids": [0, 1.5]}, "token_ids[1] = 1.5 is not a token id in [0, "),
    "bool-id.json": ({**GOOD, "token_ids": [True]}, "token_ids[0] = True is not a token id"),
    "messages.json": ({**GOOD, "messages": {"role": "user"}}, "messages must be a list, got dict"),
    "content.json": ({**GOOD, "messages": [{"role": "user", "content": 3}]}, "messages[0] must be a {role, content}"),
    "list.json": ([1, 2], "not a saved conversation"),
    "bad.json": ("{", "Expecting property name"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),
    "latin1.json": (b'{"messages": "\xe9"}', "can't decode byte 0xe9"),
}


def test_bad_saved_files_are_refused_with_one_line_and_the_console_goes_on(chat_ckpt, tmp_path):
    for name, (content, _) in BAD_FILES.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    loads = [f"/load {tmp_path / name}" for name in BAD_FILES]
    run = console(
        chat_ckpt,
        ["Hello there", *loads, f"/load {tmp_path}", "My name is Ada", f"/load {good}", "/stats", "/exit"],
        world_size=1,
    )
    assert run.returncode == 0, run.stderr
    refusals = [line for line in run.stdout.splitlines() if line.startswith("(cannot load")]
    assert len(refusals) == len(BAD_FILES) + 1, run.stdout
    for (name, (_, words)), line in zip(BAD_FILES.items(), refusals, strict=False):
        assert line.startswith(f"(cannot load {tmp_path / name}: ") and words in line, line
    assert refusals[-1] == f"(cannot load {tmp_path}: Is a directory)"
    # the conversation in progress went on: its second turn reused the first, then the good file was loaded
    stats = [line for line in run.stdout.splitlines() if line.startswith("[reused")]
    assert len(stats) == 2 and not stats[1].startswith("[reused 0 "), run.stdout
    assert f"(loaded 0 messages, 3 tokens from {good})" in run.stdout
    assert "conversation: 0 turns" in run.stdout, "/stats after /load: the loaded conversation"
