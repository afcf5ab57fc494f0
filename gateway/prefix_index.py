"""The prefix index: which replica last served each block of a prompt, in bounded memory.

Contract:
- A request's key is read from its raw body bytes, never from a second JSON parse: from where
  the prompt starts (the first of `"messages"`, `"prompt"`, `"input"`), fixed-size blocks are
  hashed in a chain (CRC-32 carried from block to block, seeded with the model id), so block
  N's key stands for everything from the prompt's start to the end of block N. Turn N+1 of a
  conversation resends turn N's bytes and adds to them: it shares turn N's leading keys,
  whatever fields come before the prompt.
- The index maps a key to the `Epoch` of the replica that last served it, or to `SHARED` once
  two replicas have: a block every replica holds (a shared system prompt) tells them apart no
  more than a block nobody holds.
- Memory is bounded: at most `capacity` entries, least recently used out first. A request's
  keys are touched deepest first, so an entry is never more recent than its prefix's: the
  index stays prefix-closed (if block N is present, so is block N-1), which lets a lookup find
  the deepest known block by binary search.
- An entry names an epoch, never a replica: once a replica goes down, is ejected or leaves,
  its epoch ends and what was recorded under it is neither trusted nor kept alive.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Final
from zlib import crc32

if TYPE_CHECKING:
    from gateway.replicas import Epoch

# Where the prompt starts in the request kinds vLLM serves: chat, completions (and tokenize),
# embeddings, responses, classify, pooling. Bytes search: `"input"` inside a JSON string value
# is escaped as `\"input\"` and cannot match.
PROMPT_KEYS: Final = (b'"messages"', b'"prompt"', b'"input"')

# One request indexes at most this many blocks: a 32 MiB body must not flush the index, and
# its first blocks already tell conversations apart.
MAX_BLOCKS: Final = 2048

# Bytes per entry at the default capacity (160,000) once evictions run, measured with
# tracemalloc on CPython 3.11 (tests/test_prefix_index.py measures it again): an OrderedDict
# slot, its linked-list node and the int key; the epochs entries point to are shared. While
# the table is rebuilt the peak reaches 221 bytes an entry; other capacities measure 148 to
# 232 bytes an entry, by how full the dict's hash table is at that size.
ENTRY_BYTES: Final = 156


class Shared(Enum):
    """The value of a block two or more replicas have served: it tells none of them apart."""

    SHARED = "shared"


SHARED: Final = Shared.SHARED


def prompt_start(body: bytes) -> int:
    """Where the prompt's key begins in a JSON body; 0 when it names none of them."""
    for key in PROMPT_KEYS:
        found = body.find(key)
        if found >= 0:
            return found
    return 0


def block_keys(body: bytes, model: str, block_bytes: int) -> list[int]:
    """The chained keys of the body's whole blocks from where the prompt starts.

    Key N is (N << 32) | the CRC-32 of the prompt's first N blocks: the position keeps two
    prefixes of different lengths apart even when their CRCs collide.
    """
    start = prompt_start(body)
    stop = min(len(body), start + block_bytes * MAX_BLOCKS) - block_bytes
    if stop < start:
        return []
    view = memoryview(body)
    chain = crc32(model.encode())
    keys = []
    number = 0
    for at in range(start, stop + 1, block_bytes):
        chain = crc32(view[at : at + block_bytes], chain)
        number += 1
        keys.append(number << 32 | chain)
    return keys


class PrefixIndex:
    """A fixed-capacity LRU map from block key to the epoch that last served it (or SHARED)."""

    __slots__ = ("capacity", "_entries")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, Epoch | Shared] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def deepest(self, keys: Sequence[int]) -> tuple[int, Epoch | None]:
        """How many leading blocks of `keys` are known, and the live epoch that last served
        the deepest of them.

        No epoch when no block is known, when the deepest one is SHARED, or when its epoch
        has ended: a shallower block can only be owned by the same epoch or be shared.
        """
        entries = self._entries
        # Deepest present key, by binary search: the index is prefix-closed.
        low, high = 0, len(keys)
        while low < high:
            middle = (low + high + 1) // 2
            if keys[middle - 1] in entries:
                low = middle
            else:
                high = middle - 1
        if low == 0:
            return 0, None
        value = entries[keys[low - 1]]
        if value is Shared.SHARED or value.replica is None:
            return low, None
        return low, value

    def record(self, keys: Sequence[int], epoch: Epoch) -> None:
        """`epoch`'s replica now holds every block of `keys`; touch them, deepest first."""
        entries = self._entries
        for key in reversed(keys):
            value = entries.get(key)
            if value is None:
                entries[key] = epoch
                continue
            if value is not epoch and value is not Shared.SHARED:
                # Another live replica also holds it: shared. An ended epoch holds nothing.
                entries[key] = Shared.SHARED if value.replica is not None else epoch
            entries.move_to_end(key)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def __repr__(self) -> str:
        return f"<PrefixIndex [{len(self._entries)} of {self.capacity} entries]>"
