"""The disk tier's files on each rank: one safetensors file per block (every layer's cache of its tokens), named by
the block's key, in a folder per fingerprint of what produced them.

    DIR/<fingerprint>/<key>.safetensors          absorb: the latent is the same on every rank; rank 0 writes it once
    DIR/<fingerprint>/<key>.rank<r>.safetensors  naive: each rank's own heads
    DIR/<fingerprint>/.tp_infer-secret           the folder's secret key (private_files.folder_secret)

DIR and its fingerprint folders must belong to the user and be writable by nobody else (a missing one is created
0700); anything else is refused at start with one line (UnsafePathError). Only tensors are stored (no pickle). A
file is used only if it is a regular file (never a symbolic link), its header names the key, fingerprint and rank
asked for, its tensors have the pool's names, shapes and dtypes, and its authentication code, an HMAC-SHA256 under
the folder's secret key over all of that and the tensors' bytes, holds: a file this tier did not write (truncated,
corrupt, another model's, forged with a recomputed checksum) is skipped with one line on stderr and its tokens are
recomputed. Writes go to a temporary file created exclusively and renamed into place, so a reader never sees half a
file and nothing is written through a planted link; a write that fails (read-only folder, full disk) is reported
once and the block is simply not kept.
"""

import contextlib
import hashlib
import json
import math
import os
import stat
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch

from tp_infer.config import ModelArgs
from tp_infer.private_files import (
    UnsafePathError,
    authenticator,
    ensure_private_dir,
    folder_secret,
    read_private,
    same_code,
    write_private,
)

FORMAT = "tp_infer-kv-2"  # 2: authenticated under the folder's secret key
SAMPLE_BYTES = 1 << 16  # of each weight file's start and end, in the fingerprint
HEADER_BYTES = 1 << 20  # at most, in a block's file beyond its tensors' bytes


def fingerprint(args: ModelArgs, ckpt_path: str | Path, world_size: int, block_size: int) -> str:
    """A digest of everything that makes a block's cache what it is: the architecture and numerics (not the
    runtime limits max_batch_size and max_seq_len, which change no value), the world size, the block size, and the
    checkpoint's weight files (names, sizes, and their first and last 64 KiB: headers and some weights)."""
    h = hashlib.blake2b(digest_size=16)
    fields = {k: v for k, v in asdict(args).items() if k not in ("max_batch_size", "max_seq_len")}
    setup = {"format": FORMAT, "args": fields, "world_size": world_size, "block_size": block_size}
    h.update(json.dumps(setup, sort_keys=True).encode())
    for path in sorted(Path(ckpt_path).glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            f.seek(max(size - SAMPLE_BYTES, 0))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def authentication(secret: bytes, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The HMAC-SHA256 under `secret` of a block file's header fields (format, key, fingerprint, rank) and its
    tensors' names, dtypes, shapes and bytes, in hex."""
    h = authenticator(secret)
    h.update(json.dumps({k: meta[k] for k in ("format", "key", "fingerprint", "rank")}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def check_folder(root: str | Path) -> None:
    """The disk tier's folder, created 0700 if missing; UnsafePathError (one line naming it) when it is not this
    user's or others may write in it, OSError when it cannot be created. For a start-up check before loading."""
    try:
        ensure_private_dir(root)
    except UnsafePathError as e:
        raise UnsafePathError(f"kv disk tier: {e}") from None


class DiskFiles:
    """This rank's access to the disk tier. `shared`: one file per block serves every rank (absorb), written by rank
    0 only. Raises UnsafePathError for a folder (or key file) that someone else could have written; a folder that
    cannot be created is reported and nothing is kept on disk."""

    def __init__(self, root: str | Path, fingerprint: str, rank: int, shared: bool):
        self.dir = Path(root) / fingerprint
        self.fingerprint, self.rank, self.shared = fingerprint, rank, shared
        self.owner = rank if not shared else "shared"
        self.writes = not shared or rank == 0
        self.reported: set[str] = set()
        self.saved = 0  # files this rank wrote
        self.secret: bytes | None = None  # None: nothing is read or written
        try:
            check_folder(root)
            check_folder(self.dir)
            try:
                self.secret = folder_secret(self.dir)
            except UnsafePathError as e:
                raise UnsafePathError(f"kv disk tier: {e}") from None
        except OSError as e:
            self.report("folder", f"cannot create {self.dir} ({e.strerror}): nothing is kept on disk")
            self.writes = False

    def report(self, kind: str, message: str) -> None:
        """One line on stderr, once per kind of trouble (a full disk would otherwise say so for every block)."""
        if kind not in self.reported:
            self.reported.add(kind)
            self.say(message)

    def say(self, message: str) -> None:
        sys.stderr.write(f"kv disk tier, rank {self.rank}: {message}\n")  # one write: ranks share the stream
        sys.stderr.flush()

    def path(self, key: bytes) -> Path:
        suffix = "" if self.shared else f".rank{self.rank}"
        return self.dir / f"{key.hex()}{suffix}.safetensors"

    def save(self, key: bytes, tensors: dict[str, torch.Tensor]) -> bool:
        """Write a block's file; False (reported once) when it cannot be written."""
        if not self.writes:
            return False
        tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
        meta = {"format": FORMAT, "key": key.hex(), "fingerprint": self.fingerprint, "rank": str(self.owner)}
        meta["mac"] = authentication(self.secret, meta, tensors)
        data = safetensors.torch.save(tensors, metadata=meta)
        path = self.path(key)
        try:
            write_private(path, data)
        except OSError as e:
            self.report(f"write {e.errno}", f"cannot write {path} ({e.strerror}): such blocks are not kept on disk")
            return False
        self.saved += 1
        return True

    def load(self, key: bytes, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict | None:
        """The block's tensors if its file is whole and was written by this tier for this key, model and rank; None
        (reported) if not. expected: the pool's tensors, {name: (shape, dtype)}."""
        if self.secret is None:
            return None
        path = self.path(key)
        size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
        try:
            data = read_private(path, limit=size + HEADER_BYTES)
            (length,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file (format {meta.get('format')!r})")
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError("made by another checkpoint or setup (world size, attention, dtypes, block size)")
            if meta.get("rank") != str(self.owner):
                raise ValueError(f"made for rank {meta.get('rank')}, not {self.owner}")
            if meta.get("key") != key.hex():
                raise ValueError(f"it holds block {meta.get('key')}, not this one")
            tensors = safetensors.torch.load(data)
            layout = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
            if layout != expected:
                raise ValueError("its tensors are not the pool's")
            if not same_code(meta.get("mac"), authentication(self.secret, meta, tensors)):
                raise ValueError("not written by this disk tier: its authentication code does not match its contents")
        except FileNotFoundError:
            self.report("missing", f"{path} is gone: recomputing what it held")
            return None
        except Exception as e:  # a damaged file may fail anywhere in parsing: skip it, whatever the error
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.say(f"skipped {path}: {reason}")
            return None
        if self.writes:
            with contextlib.suppress(OSError, NotImplementedError):
                os.utime(path, follow_symlinks=False)  # for the next job's LRU order
        return tensors

    def delete(self, key: bytes) -> None:
        if self.writes:
            self.path(key).unlink(missing_ok=True)  # removes a link itself, never what it names

    def scan(self) -> list[bytes]:
        """The keys of this rank's files (the shared ones in absorb mode), least recently used first; links and
        anything else but regular files are ignored (one line each). Temporary files left by a job that died while
        writing are removed."""
        if self.secret is None:
            return []
        suffix = ".safetensors" if self.shared else f".rank{self.rank}.safetensors"
        found = []
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):
                if self.writes:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            stem = name.removesuffix(suffix)
            if stem == name or len(stem) != 32 or "." in stem:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                key = bytes.fromhex(stem)
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime_ns, key))
            else:
                self.say(f"ignored {entry.path}: not a regular file (a symbolic link is never followed)")
        return [key for _, key in sorted(found)]
