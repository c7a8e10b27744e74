"""The tiers under the KV pool: host memory and disk. Conversations the pool evicted come back by copy, token-exact,
computing only their new tokens; files on disk outlive the job and are used only when whole and made for it."""

import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import engine_drivers as drv
import pytest
import rank_fns
import safetensors.torch
import torch
from harness import device_option, run_ranks
from processes import ENV, REPO, torchrun
from test_console import console

from tp_infer.kv.tiers import block_key, root_key


def token_lists(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(n)] for n in lengths]


def serve(world_size, ckpt, options, driver, *args):
    return run_ranks(world_size, rank_fns.serve, str(ckpt), options, driver, *args)[0]


ROUNDS = token_lists(21, [20, 6, 9])  # six conversations of 20 + 8 + 6 + 8 + 9 + 8 = 59 tokens


@pytest.mark.parametrize(("world_size", "impl"), [(1, "naive"), (2, "absorb")])
def test_host_tier_restores_evicted_conversations(converted, world_size, impl):
    """Six conversations in round robin through a pool that holds one of them: each returning turn finds its whole
    history in host memory and computes only its new tokens, with the outputs of a pool that holds them all."""
    base = {"max_seq_len": 64, "max_batch_size": 1, "attn_impl": impl}
    small = {**base, "pool_tokens": 64, "host_tokens": 512}
    tiered = serve(world_size, converted["v3"], small, drv.round_robin, 6, ROUNDS)
    roomy = serve(world_size, converted["v3"], {**base, "pool_tokens": 1024}, drv.round_robin, 6, ROUNDS)
    for small, large in zip(tiered, roomy, strict=True):
        assert [t["generated"] for t in small] == [t["generated"] for t in large]
        assert [t["computed"] for t in small] == [len(r) for r in ROUNDS]
        for turn in small[1:]:
            assert turn["reused"] == turn["prompt"] - len(ROUNDS[small.index(turn)])
    restored = [t["host"] for conv in tiered for t in conv[1:]]
    assert sum(restored) > 0 and all(t["disk"] == 0 for conv in tiered for t in conv)


# ---- the disk tier, through the batch job's command line -------------------------------------------------------

OPTIONS = ["--dtype", "fp32", "--max-seq-len", "256", "--max-batch-size", "3", "--max-new-tokens", "8"]
SHARED = token_lists(31, [32])[0]  # a prefix two of the conversations share
PROMPTS = [SHARED + p for p in token_lists(32, [13, 26])] + token_lists(33, [21])
NEW = token_lists(34, [5, 7, 3])


def batch_job(world_size: int, ckpt, root: Path, name: str, lines: list[dict], *extra: str, **popen) -> tuple:
    """Run one batch job over `lines`; returns its records by id and its stderr."""
    (root / f"{name}.in").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli = ["--ckpt-path", str(ckpt), *OPTIONS, *device_option(world_size), "--input-file", str(root / f"{name}.in")]
    cli += ["--output-file", str(root / f"{name}.out"), *extra]
    cmd = [sys.executable, "-m", "tp_infer.generate", *cli] if world_size == 1 else torchrun(world_size, *cli)
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180, **popen)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(raw) for raw in (root / f"{name}.out").read_text().splitlines()]
    return {r["id"]: r for r in records}, out.stderr


def uninterrupted(world_size, ckpt, root: Path, *extra: str) -> dict:
    """Each conversation's two turns in one job, without a disk tier: the oracle."""
    lines = [{"id": i, "turns_token_ids": [p, n]} for i, (p, n) in enumerate(zip(PROMPTS, NEW, strict=True))]
    records, _ = batch_job(world_size, ckpt, root, "whole", lines, *extra)
    return {i: r["turns"] for i, r in records.items()}


def first_job(world_size, ckpt, root: Path, *extra: str, **popen) -> tuple[dict, str]:
    lines = [{"id": i, "prompt_token_ids": p} for i, p in enumerate(PROMPTS)]
    records, err = batch_job(world_size, ckpt, root, "first", lines, *extra, **popen)
    return {i: r["turns"][0] for i, r in records.items()}, err


def second_job(world_size, ckpt, root: Path, first: dict, *extra: str) -> tuple[dict, str]:
    """Each conversation continued by a new job: its history (prompt and reply) and its new tokens."""
    lines = [
        {"id": i, "prompt_token_ids": p + first[i]["token_ids"] + n}
        for i, (p, n) in enumerate(zip(PROMPTS, NEW, strict=True))
    ]
    records, err = batch_job(world_size, ckpt, root, "second", lines, *extra)
    return {i: r["turns"][0] for i, r in records.items()}, err


@pytest.mark.parametrize(
    ("world_size", "impl", "cache"),
    [(1, "naive", "bf16"), (1, "absorb", "fp8"), (2, "absorb", "bf16"), (2, "naive", "fp8")],
)
def test_a_later_job_continues_conversations_from_disk(converted, tmp_path, world_size, impl, cache):
    """A batch job with --kv-disk-path, then another process group whose lines continue its conversations: the same
    replies as one uninterrupted run, each continued line computing only its new tokens, read from disk."""
    ckpt, setup = converted["v3"], ["--attn-impl", impl, "--kv-cache-dtype", cache]
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    whole = uninterrupted(world_size, ckpt, tmp_path, *setup)
    first, err = first_job(world_size, ckpt, tmp_path, *setup, *disk)
    assert re.search(r"disk tier \S+: 0 blocks from earlier jobs", err), err
    assert [first[i]["token_ids"] for i in range(3)] == [whole[i][0]["token_ids"] for i in range(3)]
    files = sorted((tmp_path / "kv").glob("*/*.safetensors"))
    per_block = 1 if impl == "absorb" else world_size
    history = [len(p) + 8 for p in PROMPTS]
    shared_blocks = len(SHARED) // 16
    assert len(files) == per_block * (sum(-(-h // 16) for h in history) - shared_blocks), "the shared prefix once"
    second, err = second_job(world_size, ckpt, tmp_path, first, *setup, *disk)
    for i in range(3):
        assert second[i]["token_ids"] == whole[i][1]["token_ids"], f"conversation {i}"
        assert second[i]["computed_tokens"] == len(NEW[i]), f"conversation {i}"
        assert second[i]["reused_tokens"] == history[i], f"conversation {i}"
    # read from disk once: the shared prefix serves the second conversation that needs it from the pool
    assert sum(second[i]["disk_tokens"] for i in range(3)) == sum(history) - len(SHARED)


# ---- bad disk contents: skipped, reported in one line, the outputs unchanged ----------------------------------


def block_file(folder: Path, tokens: list[int], rank: int | None) -> Path:
    """The file of the block holding `tokens` at the start of a conversation, in a fingerprint's folder."""
    key = block_key(root_key(folder.name), tokens)
    return folder / f"{key.hex()}{'' if rank is None else f'.rank{rank}'}.safetensors"


@pytest.fixture(scope="module")
def disk_jobs(converted, tmp_path_factory):
    """Per attention form at world size 2: the uninterrupted replies, the first job's replies and its disk folder."""
    out = {}
    for impl in ("naive", "absorb"):
        root = tmp_path_factory.mktemp(f"disk-{impl}")
        setup = ["--attn-impl", impl]
        whole = uninterrupted(2, converted["v3"], root, *setup)
        first, _ = first_job(2, converted["v3"], root, *setup, "--kv-disk-path", str(root / "kv"))
        out[impl] = whole, first, root / "kv"
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x5A  # in the tensors
    path.write_bytes(bytes(data))


def flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x5A  # in the JSON header
    path.write_bytes(bytes(data))


def from_world_size_1(converted, path: Path, tmp: Path) -> None:
    """Replace the file by the one a world-size-1 job wrote for the same tokens (another fingerprint)."""
    first_job(1, converted["v3"], tmp, "--attn-impl", "absorb", "--kv-disk-path", str(tmp / "kv1"))
    (other,) = (tmp / "kv1").iterdir()
    block_file(other, PROMPTS[2][:16], None).replace(path)


def forge(path: Path) -> None:
    """Replace the tensors with others of the same names, shapes and dtypes, the header kept and the unkeyed
    checksum of format 1 recomputed: what a writer without the folder's secret key can do."""
    meta = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    forged = {name: torch.full_like(t, 0.5) for name, t in safetensors.torch.load(path.read_bytes()).items()}
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(forged):
        h.update(name.encode())
        h.update(forged[name].contiguous().view(torch.uint8).numpy().tobytes())
    path.write_bytes(safetensors.torch.save(forged, metadata={**meta, "checksum": h.hexdigest()}))


def link_to_another_block(path: Path) -> None:
    """A symbolic link in place of the file, to a genuine file of the folder (another block's)."""
    other = next(p for p in sorted(path.parent.glob("*.safetensors")) if p != path and not p.is_symlink())
    path.unlink()
    path.symlink_to(other)


DAMAGES = {
    "truncated, on one rank": ("naive", 1, truncate, "skipped"),
    "flipped bytes in the tensors": ("absorb", None, flip_data, "not written by this disk tier"),
    "forged tensors, checksum recomputed": ("absorb", None, forge, "not written by this disk tier"),
    "a link to another block's file, on rank 0": ("naive", 0, link_to_another_block, "symbolic link"),
    "a link to another block's file, on rank 1": ("naive", 1, link_to_another_block, "symbolic link"),
    "flipped bytes in the header": ("naive", 0, flip_header, "skipped"),
    "a file of another world size": ("absorb", None, from_world_size_1, "another checkpoint or setup"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_file_is_skipped_and_its_tokens_recomputed(converted, disk_jobs, tmp_path, damage):
    """The first block of the third conversation is damaged between the jobs: that conversation is recomputed
    (its first block is needed for anything after it), the others still come from disk; replies are unchanged."""
    impl, rank, spoil, reason = DAMAGES[damage]
    whole, first, folder = disk_jobs[impl]
    shutil.copytree(folder, tmp_path / "kv")
    (fingerprint_folder,) = (tmp_path / "kv").iterdir()
    target = block_file(fingerprint_folder, PROMPTS[2][:16], rank)
    assert target.exists()
    if spoil is from_world_size_1:
        spoil(converted, target, tmp_path)
    else:
        spoil(target)
    second, err = second_job(
        2, converted["v3"], tmp_path, first, "--attn-impl", impl, "--kv-disk-path", str(tmp_path / "kv")
    )
    lines = [line for line in err.splitlines() if "kv disk tier" in line]
    assert len(lines) >= 1 and all(reason in line or "skipped" in line for line in lines), err
    assert any(reason in line for line in lines), err
    for i in range(3):
        assert second[i]["token_ids"] == whole[i][1]["token_ids"], f"conversation {i}"
    assert second[2]["computed_tokens"] == second[2]["prompt_tokens"] and second[2]["disk_tokens"] == 0
    assert [second[i]["computed_tokens"] for i in (0, 1)] == [len(NEW[0]), len(NEW[1])]
    original = folder / fingerprint_folder.name / target.name
    assert not target.is_symlink(), "the bad file is deleted, the recomputed block saved"
    assert target.stat().st_size == original.stat().st_size, "the bad file is deleted, the recomputed block saved"


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a block's file is larger: as if the disk were full


@pytest.mark.parametrize("trouble", ["full", "cannot be created"])
def test_a_disk_that_cannot_be_written_is_reported_once_per_rank(converted, disk_jobs, tmp_path, trouble):
    """Writes that fail (a full disk; a folder that cannot be created) are said once per rank, in one line; the
    job's replies are those of a run without the disk tier."""
    whole, _, _ = disk_jobs["naive"]
    popen, path = {}, tmp_path / "kv"
    if trouble == "full":
        popen["preexec_fn"] = limit_file_size
    elif os.geteuid() == 0:
        path = Path("/sys/tp_infer_kv")  # root may write anywhere but there
    else:
        (tmp_path / "read-only").mkdir(mode=0o500)
        path = tmp_path / "read-only" / "kv"
    first, err = first_job(2, converted["v3"], tmp_path, "--attn-impl", "naive", "--kv-disk-path", str(path), **popen)
    assert [first[i]["token_ids"] for i in range(3)] == [whole[i][0]["token_ids"] for i in range(3)]
    lines = [line for line in err.splitlines() if "kv disk tier" in line]
    expected = "cannot write" if trouble == "full" else "cannot create"
    assert sorted(line.split(":")[0] for line in lines) == ["kv disk tier, rank 0", "kv disk tier, rank 1"], err
    assert all(expected in line for line in lines), err


def test_console_load_with_a_disk_tier_computes_only_the_new_tokens(chat_ckpt, tmp_path):
    """/save in one console, /load in the next process: the loaded history comes from disk, not recomputed, and the
    conversation goes on as it would have in one process."""
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    saved, whole, resumed = tmp_path / "saved.json", tmp_path / "whole.json", tmp_path / "resumed.json"
    lines = ["Hello there", "My name is Ada", f"/save {saved}", "how are you today?", f"/save {whole}", "/exit"]
    run = console(chat_ckpt, lines, world_size=1)
    assert run.returncode == 0, run.stderr
    first = console(chat_ckpt, ["Hello there", "My name is Ada", f"/save {saved}", "/exit"], world_size=1, extra=disk)
    assert first.returncode == 0, first.stderr
    second = console(chat_ckpt, [f"/load {saved}", "how are you today?", f"/save {resumed}", "/exit"], 1, disk)
    assert second.returncode == 0, second.stderr
    history = len(json.loads(saved.read_text())["token_ids"])
    (stats,) = [line for line in second.stdout.splitlines() if line.startswith("[reused")]
    assert stats.startswith(f"[reused {history} · {history} from disk · computed "), stats
    assert json.loads(resumed.read_text()) == json.loads(whole.read_text())


def test_a_later_job_finds_text_conversations_on_disk_too(chat_ckpt, tmp_path):
    """A messages line in a new job that continues an earlier job's conversation, its reply sent back as text:
    the reply's generated ids are remembered beside the disk tier's files, so the whole history comes from disk."""
    system, users = "Be brief.", ["Hello there,", "My name is Ada"]
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    whole, _ = batch_job(1, chat_ckpt, tmp_path, "whole", [{"id": "w", "system": system, "turns": users}])
    asked = [{"role": "system", "content": system}, {"role": "user", "content": users[0]}]
    first, _ = batch_job(1, chat_ckpt, tmp_path, "first", [{"id": "a", "messages": asked}], *disk)
    reply = first["a"]["turns"][0]
    assert reply["text"] == whole["w"]["turns"][0]["text"]
    messages = [*asked, {"role": "assistant", "content": reply["text"]}, {"role": "user", "content": users[1]}]
    second, _ = batch_job(1, chat_ckpt, tmp_path, "second", [{"id": "b", "messages": messages}], *disk)
    turn = second["b"]["turns"][0]
    history = reply["prompt_tokens"] + len(reply["token_ids"])
    assert turn["text"] == whole["w"]["turns"][1]["text"]
    assert turn["reused_tokens"] == turn["disk_tokens"] == history
    assert turn["computed_tokens"] == turn["prompt_tokens"] - history
