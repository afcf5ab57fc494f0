"""The prefix index: which replica last served each block of a prompt, in bounded memory.

Contract:
- A request's key is read from its raw body bytes, never from a second JSON parse: from where
  the prompt starts (the first of `"messages"`, `"prompt"`, `"input"`), blocks are hashed in
  a chain (each block's hash taken with the one before, the first with the model id), so
  block N's key stands for everything from the prompt's start to the end of block N. Turn N+1
  of a conversation resends turn N's bytes and adds to them: it shares turn N's leading keys,
  whatever fields come before the prompt.
- Blocks are `block_bytes` long for the first 16, then each 16 twice as long as the 16
  before: fine-grained where conversations part, and a 200 KB prompt is 89 blocks rather
  than 800 (the cost of a key is mostly per block, and so is the index's memory).
- The index maps a key to the `Epoch` of the replica that last served it, or to `SHARED` once
  two replicas have: a block every replica holds (a shared system prompt) tells them apart no
  more than a block nobody holds.
- Memory is bounded: at most `capacity` entries, least recently used out first. A request's
  keys are touched deepest first, so an entry is never more recent than its prefix's: the
  index stays prefix-closed (if block N is present, so is block N-1), which lets a lookup find
  the deepest known block by binary search.
- An entry names an epoch, never a replica: once a replica goes down, is ejected or leaves,
  its epoch ends and what was recorded under it is neither trusted nor kept alive.
- A retry's replica takes over the blocks of the replicas the request failed on, rather than
  sharing them: the conversation now lives where it was served, and marking its blocks
  SHARED would scatter its next turns (a refused connection says nothing to the index until
  a health check sees the replica down).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.replicas import Epoch, Replica

# Where the prompt starts in the request kinds vLLM serves: chat, completions (and tokenize),
# embeddings, responses, classify, pooling. Bytes search: `"input"` inside a JSON string value
# is escaped as `\"input\"` and cannot match.
PROMPT_KEYS: Final = (b'"messages"', b'"prompt"', b'"input"')

# Blocks keep their size this many at a time, then double.
GROWTH_EVERY: Final = 16

# Bytes per entry at the default capacity (160,000) once evictions run, measured with
# tracemalloc on CPython 3.11 (tests/test_prefix_index.py measures it again): an OrderedDict
# slot, its linked-list node and the 64-bit int key; the epochs entries point to are shared.
# While the table is rebuilt the peak reaches 225 bytes an entry. Other capacities measure up
# to about 235 bytes an entry, by how full the dict's hash table is at that size.
ENTRY_BYTES: Final = 159


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

    Python's own 64-bit hash of bytes (SipHash), taken on memoryview slices so no block is
    copied: per process, which is all an in-process index needs.
    """
    at = prompt_start(body)
    end = len(body)
    view = memoryview(body)
    chain = hash(model)
    keys = []
    size = block_bytes
    left = GROWTH_EVERY
    while at + size <= end:
        chain = hash((chain, view[at : at + size]))
        keys.append(chain)
        at += size
        left -= 1
        if not left:
            size *= 2
            left = GROWTH_EVERY
    return keys


def span(blocks: int, block_bytes: int) -> int:
    """How many bytes of the prompt the first `blocks` blocks cover."""
    doublings, rest = divmod(blocks, GROWTH_EVERY)
    return block_bytes * (GROWTH_EVERY * ((1 << doublings) - 1) + rest * (1 << doublings))


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

    def anchor(self, keys: Sequence[int]) -> int:
        """How many leading blocks name a conversation the same way in every gateway process:
        those known as shared (a system prompt), then one more, the first of its own.

        While nothing is known as shared but the first block has been seen, all of them: a
        prompt that one replica holds but no second one has served yet must not send every
        new conversation after it to that replica, or it would never be seen as shared.
        """
        entries = self._entries
        count = len(keys)
        shared = 0
        while shared < count and entries.get(keys[shared]) is Shared.SHARED:
            shared += 1
        if shared == 0 and keys[0] in entries:
            return count
        return min(shared + 1, count)

    def record(self, keys: Sequence[int], epoch: Epoch, replacing: Container[Replica] = ()) -> None:
        """`epoch`'s replica now holds every block of `keys`; touch them, deepest first.
        `replacing`: the replicas this request failed on, whose claims it takes over."""
        entries = self._entries
        for key in reversed(keys):
            value = entries.get(key)
            if value is None:
                entries[key] = epoch
                continue
            if value is not epoch and value is not Shared.SHARED:
                # Another live replica also holds it: shared. An ended epoch holds nothing.
                owner = value.replica
                entries[key] = (
                    Shared.SHARED if owner is not None and owner not in replacing else epoch
                )
            entries.move_to_end(key)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def __repr__(self) -> str:
        return f"<PrefixIndex [{len(self._entries)} of {self.capacity} entries]>"
