"""The disk tier trusts nothing in its folder it did not write: a folder someone else owns or may write in is refused,
files are never read or written through links, a forged block (its tensors replaced, its checksum recomputed) is
skipped, and the ids remembered beside it are range-checked. Each refusal is one line."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from processes import ENV, REPO

from tp_infer import private_files
from tp_infer.chat import ReplyMemory
from tp_infer.kv.disk import FORMAT, DiskFiles
from tp_infer.private_files import (
    SECRET_NAME,
    UnsafePathError,
    check_private_file,
    ensure_private_dir,
    folder_secret,
    read_private,
    write_private,
)

KEY = bytes(range(16))
LAYOUT = {"k": ((2, 3), torch.float32), "v": ((4,), torch.bfloat16)}
OTHER_UID = 54321


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, (shape, dtype) in LAYOUT.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files(root: Path, rank: int = 0, shared: bool = True) -> DiskFiles:
    return DiskFiles(root, "fp", rank, shared)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line]
    assert len(lines) == 1, text
    return lines[0]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")


# ---------------------------------------------------------------------------------------------------- the folder


def test_a_missing_folder_is_created_private_with_a_private_key(tmp_path):
    disk = files(tmp_path / "kv")
    for folder in (tmp_path / "kv", disk.dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    key_file = disk.dir / SECRET_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    assert files(tmp_path / "kv").secret == disk.secret, "the next job finds the same key"
    assert files(tmp_path / "other").secret != disk.secret


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_folder_others_may_write_in_is_refused_in_one_line(tmp_path, mode):
    root = tmp_path / "kv"
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(UnsafePathError) as e:
        files(root)
    message = one_line(str(e.value))
    assert str(root) in message and f"{mode:04o}" in message and "writable by" in message
    assert not (root / "fp").exists(), "nothing is created in it"


def test_a_fingerprint_folder_others_may_write_in_is_refused(tmp_path):
    files(tmp_path / "kv")
    (tmp_path / "kv" / "fp").chmod(0o777)
    with pytest.raises(UnsafePathError, match="fp is writable by its group and others"):
        files(tmp_path / "kv")


@needs_root
@pytest.mark.parametrize("which", ["root", "fingerprint folder", "key file"])
def test_a_folder_or_key_of_another_user_is_refused_in_one_line(tmp_path, which):
    disk = files(tmp_path / "kv")
    target = {"root": tmp_path / "kv", "fingerprint folder": disk.dir, "key file": disk.dir / SECRET_NAME}[which]
    os.chown(target, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePathError) as e:
        files(tmp_path / "kv")
    message = one_line(str(e.value))
    assert str(target) in message and f"uid {OTHER_UID}" in message and "not to this user" in message


def test_a_key_others_may_read_or_a_short_key_is_refused(tmp_path):
    disk = files(tmp_path / "kv")
    key_file = disk.dir / SECRET_NAME
    key_file.chmod(0o644)
    with pytest.raises(UnsafePathError, match="may be read by others"):
        files(tmp_path / "kv")
    key_file.chmod(0o600)
    key_file.write_bytes(b"short")
    with pytest.raises(UnsafePathError, match="not a key of 32 bytes"):
        files(tmp_path / "kv")


def test_a_linked_key_is_refused(tmp_path):
    disk = files(tmp_path / "kv")
    key_file = disk.dir / SECRET_NAME
    (tmp_path / "planted").write_bytes(bytes(32))
    key_file.unlink()
    key_file.symlink_to(tmp_path / "planted")
    with pytest.raises(UnsafePathError, match="is a symbolic link: not followed"):
        files(tmp_path / "kv")


def test_ensure_private_dir_follows_a_link_to_judge_the_folder_it_names(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert ensure_private_dir(tmp_path / "link") == tmp_path / "link"
    (tmp_path / "real").chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable"):
        ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises((UnsafePathError, FileExistsError)):
        ensure_private_dir(tmp_path / "file")


# ---------------------------------------------------------------------------------------------------- the blocks


def test_a_block_round_trips_and_its_file_is_private(tmp_path, capsys):
    disk = files(tmp_path / "kv")
    saved = tensors()
    assert disk.save(KEY, saved)
    path = disk.path(KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert same(disk.load(KEY, LAYOUT), saved)
    assert disk.scan() == [KEY]
    assert capsys.readouterr().err == ""


def forge(path: Path, meta_update: dict, replace: dict) -> None:
    """Rewrite a block's file with other tensors and its header's fields as given, as someone without the key can."""
    data = path.read_bytes()
    (length,) = __import__("struct").unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + length])["__metadata__"]
    path.write_bytes(safetensors.torch.save(replace, metadata={**meta, **meta_update}))


def old_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The unkeyed blake2b checksum format 1 carried: anyone can recompute it."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("how", ["header kept", "checksum recomputed", "mac of another folder's key"])
def test_a_forged_block_is_skipped_in_one_line(tmp_path, capsys, how):
    """Tensors replaced in a block's file: whatever its header says, without the folder's key it is not used."""
    disk = files(tmp_path / "kv")
    assert disk.save(KEY, tensors(0))
    forged = tensors(1)
    update = {}
    if how == "checksum recomputed":
        update = {"checksum": old_checksum(forged)}
    elif how == "mac of another folder's key":
        other = files(tmp_path / "elsewhere")
        assert other.save(KEY, forged)
        os.replace(other.path(KEY), disk.path(KEY))  # a whole file of the same format, another key's code
    if how != "mac of another folder's key":
        forge(disk.path(KEY), update, forged)
    capsys.readouterr()
    assert disk.load(KEY, LAYOUT) is None
    line = one_line(capsys.readouterr().err)
    assert line.startswith("kv disk tier, rank 0: skipped ") and "not written by this disk tier" in line


def test_a_file_of_the_previous_format_is_skipped(tmp_path, capsys):
    disk = files(tmp_path / "kv")
    old = tensors()
    meta = {"format": "tp_infer-kv-1", "key": KEY.hex(), "fingerprint": "fp", "rank": "shared"}
    disk.path(KEY).write_bytes(safetensors.torch.save(old, metadata={**meta, "checksum": old_checksum(old)}))
    assert disk.load(KEY, LAYOUT) is None
    assert f"not a {FORMAT} file" in one_line(capsys.readouterr().err)


def test_a_file_larger_than_a_block_is_not_read(tmp_path, capsys):
    disk = files(tmp_path / "kv")
    disk.path(KEY).write_bytes(b"\0" * (2 << 20))
    assert disk.load(KEY, LAYOUT) is None
    assert "more than the" in one_line(capsys.readouterr().err)


def test_a_linked_block_file_is_neither_read_nor_listed(tmp_path, capsys):
    """A link in place of a block's file, to a genuine file of this folder: never followed."""
    disk = files(tmp_path / "kv")
    other_key = bytes(16)
    assert disk.save(other_key, tensors())
    disk.path(KEY).symlink_to(disk.path(other_key))
    capsys.readouterr()
    assert disk.scan() == [other_key]
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"kv disk tier, rank 0: ignored {disk.path(KEY)}: not a regular file"), line
    assert disk.load(KEY, LAYOUT) is None
    assert "skipped" in one_line(capsys.readouterr().err)


@pytest.fixture
def fixed_temporaries(monkeypatch):
    """Temporary names made guessable, as a planted link needs."""
    monkeypatch.setattr(private_files.secrets, "token_hex", lambda n: "guessed")


def test_a_linked_temporary_is_not_written_through(tmp_path, capsys, fixed_temporaries):
    disk = files(tmp_path / "kv")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tmp = private_files.temporary_path(disk.path(KEY))
    tmp.symlink_to(victim)
    assert not disk.save(KEY, tensors())
    line = one_line(capsys.readouterr().err)
    assert "cannot write" in line and str(disk.path(KEY)) in line
    assert victim.read_text() == "precious" and tmp.is_symlink() and not disk.path(KEY).exists()
    assert disk.load(KEY, LAYOUT) is None


def test_write_private_replaces_a_link_not_what_it_names(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").symlink_to(victim)
    write_private(tmp_path / "out", b"new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out").is_symlink() and read_private(tmp_path / "out") == b"new"


def test_read_private_refuses_links_fifos_and_other_users_files(tmp_path):
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        read_private(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_private(tmp_path / "fifo")  # refused, not blocked waiting for a writer
    if os.geteuid() == 0:
        os.chown(tmp_path / "real", OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePathError, match=f"uid {OTHER_UID}"):
            read_private(tmp_path / "real")


def test_check_private_file_accepts_only_this_users_regular_unshared_files(tmp_path):
    lib = tmp_path / "kernels.so"
    lib.write_bytes(b"x")
    lib.chmod(0o755)
    check_private_file(lib)
    (tmp_path / "link.so").symlink_to(lib)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        check_private_file(tmp_path / "link.so")
    lib.chmod(0o775)
    with pytest.raises(UnsafePathError, match="writable by others"):
        check_private_file(lib)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        check_private_file(tmp_path)
    if os.geteuid() == 0:
        lib.chmod(0o755)
        os.chown(lib, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePathError, match=f"uid {OTHER_UID}"):
            check_private_file(lib)


def test_folder_secret_is_shared_by_every_caller(tmp_path):
    keys = {folder_secret(tmp_path) for _ in range(3)}
    assert len(keys) == 1 and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -------------------------------------------------------------------------------------------- the replies' ids


def memory_file(tmp_path: Path, records: list[dict]) -> Path:
    memory = ReplyMemory()
    for r in records:
        memory.remember(r["prompt"], r["text"], r["ids"])
    path = tmp_path / "replies.jsonl"
    memory.save(path)
    return path


def test_replies_round_trip(tmp_path, capsys):
    path = memory_file(tmp_path, [{"prompt": [5, 6], "text": "hi", "ids": [7, 8, 1]}])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    memory = ReplyMemory.load(path, vocab_size=100)
    assert memory.recall([5, 6], "hi") == [7, 8, 1]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("ids", [[999999, 1], [-1, 2], [True, 2], [2**70, 1]])
def test_replies_with_ids_out_of_the_vocabulary_are_dropped_in_one_line(tmp_path, capsys, ids):
    path = memory_file(
        tmp_path, [{"prompt": [5, 6], "text": "hi", "ids": [7, 8]}, {"prompt": [9], "text": "x", "ids": ids}]
    )
    memory = ReplyMemory.load(path, vocab_size=100)
    assert memory.recall([9], "x") is None and memory.recall([5, 6], "hi") == [7, 8]
    line = one_line(capsys.readouterr().err)
    assert "replies" in line and "1 record" in line and "[0, 100)" in line


def test_replies_edited_on_disk_are_dropped_in_one_line(tmp_path, capsys):
    """Valid ids substituted in the file: not what this program wrote, so not used."""
    path = memory_file(tmp_path, [{"prompt": [5, 6], "text": "hi", "ids": [7, 8]}])
    record = json.loads(path.read_text())
    record["ids"] = [9, 9]
    path.write_text(json.dumps(record) + "\n")
    memory = ReplyMemory.load(path, vocab_size=100)
    assert memory.recall([5, 6], "hi") is None
    assert "not written by this program" in one_line(capsys.readouterr().err)


def test_a_linked_replies_file_is_refused_in_one_line(tmp_path, capsys):
    real = memory_file(tmp_path, [{"prompt": [5, 6], "text": "hi", "ids": [7, 8]}])
    (tmp_path / "sub").mkdir(mode=0o700)
    link = tmp_path / "sub" / "replies.jsonl"
    link.symlink_to(real)
    memory = ReplyMemory.load(link, vocab_size=100)
    assert not memory.replies
    line = one_line(capsys.readouterr().err)
    assert str(link) in line and "not used" in line


# ---------------------------------------------------------------------------------------------- whole jobs


def job(ckpt, tmp_path: Path, disk: Path) -> subprocess.CompletedProcess:
    """A one-line batch job at world size 1 with a disk tier in `disk`."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 0, "prompt_token_ids": [5, 6, 7]}) + "\n")
    cli = ["--ckpt-path", str(ckpt), "--dtype", "fp32", "--max-seq-len", "64", "--max-new-tokens", "4"]
    cli += ["--input-file", str(tmp_path / "in.jsonl"), "--output-file", str(tmp_path / "out.jsonl")]
    cmd = [sys.executable, "-m", "tp_infer.generate", *cli, "--kv-disk-path", str(disk)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("owner", ["world-writable", "another user's"])
def test_a_job_refuses_an_unsafe_disk_folder_in_one_line(converted, tmp_path, owner):
    disk = tmp_path / "kv"
    disk.mkdir(mode=0o700)
    if owner == "world-writable":
        disk.chmod(0o777)
    elif os.geteuid() == 0:
        os.chown(disk, OTHER_UID, OTHER_UID)
    else:
        pytest.skip("giving a folder to another user needs root")
    run = job(converted["v3"], tmp_path, disk)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"kv disk tier: folder {disk}" in errors[0], errors[0]
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()
    assert [p.name for p in disk.iterdir()] == [], "nothing written in it"


def test_a_reply_memory_with_an_id_out_of_the_vocabulary_is_dropped_and_the_job_goes_on(chat_ckpt, tmp_path):
    """[999999, 1] put into replies.jsonl between two jobs (its record's code left as it was): the record is
    dropped with one line, and the continued conversation gets the reply of a job that remembers nothing."""
    from test_tiers import batch_job

    system, users = "Be brief.", ["Hello there,", "My name is Ada"]
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    asked = [{"role": "system", "content": system}, {"role": "user", "content": users[0]}]
    first, _ = batch_job(1, chat_ckpt, tmp_path, "first", [{"id": "a", "messages": asked}], *disk)
    (replies,) = (tmp_path / "kv").glob("*/replies.jsonl")
    records = [json.loads(line) for line in replies.read_text().splitlines()]
    assert len(records) == 1
    records[0]["ids"] = [999999, 1]
    replies.write_text(json.dumps(records[0]) + "\n")
    reply = first["a"]["turns"][0]
    messages = [*asked, {"role": "assistant", "content": reply["text"]}, {"role": "user", "content": users[1]}]
    second, err = batch_job(1, chat_ckpt, tmp_path, "second", [{"id": "b", "messages": messages}], *disk)
    lines = [line for line in err.splitlines() if "reply memory" in line]
    assert len(lines) == 1 and "dropped 1 record" in lines[0], err
    alone, _ = batch_job(1, chat_ckpt, tmp_path, "alone", [{"id": "b", "messages": messages}])  # no memory at all
    assert second["b"]["turns"][0]["token_ids"] == alone["b"]["turns"][0]["token_ids"]


def test_replies_without_a_valid_code_or_unparsable_are_dropped_in_one_line(tmp_path, capsys):
    path = memory_file(tmp_path, [{"prompt": [5, 6], "text": "hi", "ids": [7, 8]}])
    good = path.read_text()
    bad = [
        {"key": "00" * 16, "text": "x", "ids": [1]},  # format of old: no code
        {"key": "00" * 16, "text": "x", "ids": [1], "mac": "é\ud800"},
        {"key": "00" * 16, "text": "x", "ids": [1], "mac": ["not", "a", "string"]},
    ]
    path.write_text(good + "".join(json.dumps(r) + "\n" for r in bad) + "[1, 2]\nnot json\n")
    memory = ReplyMemory.load(path, vocab_size=100)
    assert list(memory.replies.values()) == [("hi", [7, 8])]
    line = one_line(capsys.readouterr().err)
    assert "dropped 5 records (3 not written by this program, 2 that do not parse)" in line, line


def test_a_block_with_a_code_that_is_not_text_is_skipped(tmp_path, capsys):
    disk = files(tmp_path / "kv")
    assert disk.save(KEY, tensors())
    forge(disk.path(KEY), {"mac": "é∂"}, tensors())
    capsys.readouterr()
    assert disk.load(KEY, LAYOUT) is None
    assert "not written by this disk tier" in one_line(capsys.readouterr().err)
