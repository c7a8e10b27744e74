"""Rank 0's bookkeeping of the tiers under the KV pool: host memory and disk, each LRU, both indexed by block keys.

A block's key is a hash chained from the root over every block before it, so one key names a whole prefix: the key
of block k is blake2b(key of block k-1 + its token ids), and the root's key binds everything else that shapes the
cache (checkpoint, world size, attention form, dtypes, block size) and, for a request with a cache_salt, the salt
(salted_root): blocks saved under one salt are never found under another. A block the pool evicts moves to the host tier
(when there is one); a block the host tier evicts is written to disk unless it is there already; files stay on
disk until the disk tier's cap evicts them, so they outlive the job. What moves where is a list of transfers that
every rank runs, in order, before the step's block copies and forward.
"""

import enum
import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

KEY_BYTES = 16


def block_key(parent: bytes, tokens: tuple[int, ...] | list[int]) -> bytes:
    """The key of a block holding `tokens` after the prefix whose last block's key is `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=KEY_BYTES).digest()


def root_key(fingerprint: str) -> bytes:
    """The key every chain starts from: different for anything that would make the cache differ."""
    return hashlib.blake2b(fingerprint.encode(), digest_size=KEY_BYTES).digest()


def salted_root(root: bytes, cache_salt: str | bytes | None) -> bytes:
    """The root key of a cache_salt's namespace: the chains of its prompts start there, so that its blocks' keys (in
    the tree, host memory and on disk) are never another salt's. None is the shared namespace, `root` itself; any
    other salt, "" included, is a namespace of its own. Nothing of the salt reaches the model."""
    if cache_salt is None:
        return root
    salt = cache_salt.encode("utf-8", "surrogatepass") if isinstance(cache_salt, str) else bytes(cache_salt)
    return hashlib.blake2b(root + salt, digest_size=KEY_BYTES, person=b"tp_infer salt").digest()


class Transfer(enum.IntEnum):
    """One move of a block's data (in every layer). Rows on the wire: (op, a, b, key) as in each docstring."""

    DEMOTE = 0  # pool block a -> host slot b
    PROMOTE = 1  # host slot a -> pool block b
    SAVE_HOST = 2  # host slot a -> the file of key
    SAVE_POOL = 3  # pool block a -> the file of key
    LOAD = 4  # the file of key -> host slot b; every rank says whether it could
    DELETE = 5  # remove the file of key


def touch(lru: OrderedDict, keys: list[bytes]) -> None:
    """Move the keys lru holds to its newest end, the first key last (newest)."""
    for key in reversed(keys):
        if key in lru:
            lru.move_to_end(key)


@dataclass(eq=False)
class HostEntry:
    key: bytes
    slot: int
    from_disk: bool  # loaded from disk and not yet used: its tokens count as restored from disk


class HostTier:
    """num_slots blocks of host memory, holding blocks evicted from the pool (or read back from disk), LRU."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free: deque[int] = deque(range(num_slots))
        self.entries: OrderedDict[bytes, HostEntry] = OrderedDict()  # oldest first

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, key: bytes, from_disk: bool = False) -> tuple[HostEntry, list[HostEntry]]:
        """A slot for a new block (the newest), and the entries evicted to make room (oldest first): their data
        must be saved or dropped before anything is written into their slots."""
        assert key not in self.entries and self.num_slots > 0
        evicted = []
        while not self.free:
            _, old = self.entries.popitem(last=False)
            evicted.append(old)
            self.free.append(old.slot)
        entry = HostEntry(key, self.free.popleft(), from_disk)
        self.entries[key] = entry
        return entry, evicted

    def take(self, key: bytes) -> HostEntry:
        """Take an entry out of the index to copy it back to the pool; its slot stays reserved until release()."""
        return self.entries.pop(key)

    def put_back(self, entry: HostEntry) -> None:
        """An entry taken that could not be copied after all: indexed again, as the newest."""
        self.entries[entry.key] = entry

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def touch(self, keys: list[bytes]) -> None:
        """Just used, the first key newest (pass a chain from its start, so that the blocks after a block, useless
        without it, are evicted before it)."""
        touch(self.entries, keys)

    def clear(self) -> int:
        """Forget every block held (a cache flush): their slots are free again. Slots taken for a promotion under
        way are not in the index and stay reserved. Returns the blocks forgotten."""
        count = len(self.entries)
        self.free.extend(entry.slot for entry in self.entries.values())
        self.entries.clear()
        return count


class DiskTier:
    """The keys whose files are on disk (rank 0's own files, or the shared ones), at most `capacity`, LRU."""

    def __init__(self, capacity: int, keys: list[bytes] = ()):
        """keys: found on disk at start, oldest first; beyond the capacity the oldest are evicted by evict_over()."""
        self.capacity = capacity
        self.index: OrderedDict[bytes, None] = OrderedDict((k, None) for k in keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def add(self, key: bytes) -> list[bytes]:
        """A file written for key (the newest); returns the keys evicted for it, whose files must be deleted."""
        self.index[key] = None
        self.index.move_to_end(key)
        return self.evict_over()

    def evict_over(self) -> list[bytes]:
        evicted = []
        while len(self.index) > self.capacity:
            key, _ = self.index.popitem(last=False)
            evicted.append(key)
        return evicted

    def remove(self, key: bytes) -> None:
        self.index.pop(key, None)

    def touch(self, keys: list[bytes]) -> None:
        """Just used, the first key newest (as HostTier.touch)."""
        touch(self.index, keys)

    def clear(self) -> list[bytes]:
        """Forget every file (a cache flush); returns their keys, whose files must be deleted."""
        keys = list(self.index)
        self.index.clear()
        return keys


@dataclass
class Tiers:
    """What rank 0 keeps of the tiers; either may be absent."""

    root: bytes
    host: HostTier | None = None
    disk: DiskTier | None = None

    @property
    def reads_disk(self) -> bool:
        """Whether anything can be read back from disk: files there, and host memory to read them into."""
        return self.host is not None and self.disk is not None and len(self.disk) > 0


def make_tiers(fingerprint: str, host_blocks: int, disk_blocks: int, on_disk: list[bytes] | None) -> Tiers | None:
    """Rank 0's tiers: host memory of host_blocks, and with on_disk (the keys found there, oldest first) a disk tier
    of disk_blocks. None when there is neither."""
    if not host_blocks and on_disk is None:
        return None
    host = HostTier(host_blocks) if host_blocks else None
    disk = DiskTier(disk_blocks, on_disk) if on_disk is not None else None
    return Tiers(root_key(fingerprint), host, disk)
