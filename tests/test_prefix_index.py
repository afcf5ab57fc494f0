"""The prefix index on its own: keys from raw bytes, the cap, its memory, epochs, sharing."""

from __future__ import annotations

import os
import tracemalloc

import orjson

from gateway.backends import Backend
from gateway.prefix_index import ENTRY_BYTES, PrefixIndex, block_keys, prompt_start, span
from gateway.replicas import Replica

BLOCK = 256


def body(messages: list[dict[str, str]], **fields: object) -> bytes:
    return orjson.dumps({**fields, "messages": messages, "stream": True})


def turns(count: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief. " * 60}]
    for turn in range(count):
        messages.append({"role": "user", "content": f"Question {turn}: " + "why? " * 80})
        messages.append({"role": "assistant", "content": f"Answer {turn}: " + "because. " * 50})
    return messages[:-1]


def replica(url: str = "http://a:1") -> Replica:
    return Replica(Backend(url))


def test_the_prompt_starts_at_the_first_prompt_key_in_the_body() -> None:
    assert prompt_start(b'{"model":"m","messages":[]}') == 13
    assert prompt_start(b'{"model":"m","prompt":"x"}') == 13
    assert prompt_start(b'{"model":"m","input":["x"]}') == 13
    # A key-like string inside a value is escaped, so it cannot be taken for the key.
    assert prompt_start(b'{"input":"say \\"messages\\" twice"}') == 1
    assert prompt_start(b'{"model":"m","text_1":"a"}') == 0


def test_the_next_turn_shares_every_whole_block_of_the_previous_turns_prompt() -> None:
    first = block_keys(body(turns(1), model="m"), "m", BLOCK)
    second = block_keys(body(turns(2), model="m"), "m", BLOCK)
    assert len(second) > len(first) > 2
    # All but the last block of turn 1 hold only bytes that turn 2 resends as they were.
    assert second[: len(first) - 1] == first[:-1]


def test_fields_before_the_prompt_do_not_change_its_keys() -> None:
    plain = block_keys(body(turns(2), model="m"), "m", BLOCK)
    busy = block_keys(body(turns(2), model="m", temperature=0.7, user="u-1"), "m", BLOCK)
    assert plain == busy


def test_keys_differ_by_model_so_adapters_of_one_base_do_not_share() -> None:
    data = body(turns(1), model="base")
    assert set(block_keys(data, "base", BLOCK)).isdisjoint(block_keys(data, "sql-lora", BLOCK))


def test_a_body_shorter_than_a_block_has_no_key_and_long_ones_have_few() -> None:
    assert block_keys(b'{"model":"m","prompt":"hi"}', "m", BLOCK) == []
    # 16 blocks of 256 bytes, 16 of 512, 16 of 1 KiB...: 200 KB of prompt is 89 blocks.
    long = b'{"model":"m","prompt":"' + b"x" * 204_800 + b'"}'
    keys = block_keys(long, "m", BLOCK)
    assert len(keys) == 89 and len(set(keys)) == 89
    assert span(89, BLOCK) <= len(long) - 13 < span(90, BLOCK)
    assert [span(n, BLOCK) for n in (0, 1, 16, 17, 32)] == [0, 256, 4096, 4608, 12288]
    huge = b'{"model":"m","prompt":"' + b"x" * (32 << 20) + b'"}'
    assert len(block_keys(huge, "m", BLOCK)) < 220


def test_the_deepest_known_block_names_its_owner() -> None:
    one, two = replica("http://a:1"), replica("http://b:2")
    index = PrefixIndex(1000)
    short = block_keys(body(turns(1), model="m"), "m", BLOCK)
    index.record(short, one.epoch)
    longer = block_keys(body(turns(3), model="m"), "m", BLOCK)
    # The longer prompt resends the shorter one: all its blocks but maybe the last (which
    # may hold the bytes after the prompt) lead the longer one's.
    common = next(n for n, (a, b) in enumerate(zip(short + [0], longer, strict=False)) if a != b)
    assert common >= len(short) - 1
    assert index.deepest(longer) == (common, one.epoch)
    assert index.deepest(block_keys(body(turns(1), model="n"), "n", BLOCK)) == (0, None)
    # A second replica serving the same prompt makes it shared: it tells no one apart.
    index.record(short, two.epoch)
    assert index.deepest(short) == (len(short), None)


def test_an_ended_epoch_is_not_trusted_and_its_blocks_go_to_the_next_owner() -> None:
    one, two = replica("http://a:1"), replica("http://b:2")
    index = PrefixIndex(1000)
    keys = block_keys(body(turns(2), model="m"), "m", BLOCK)
    index.record(keys, one.epoch)
    old = one.epoch
    one.new_epoch()  # down, ejected or gone, then back
    assert old.replica is None and one.epoch.replica is one
    assert index.deepest(keys) == (len(keys), None)
    index.record(keys, two.epoch)
    assert index.deepest(keys) == (len(keys), two.epoch)


def test_a_retry_takes_over_what_the_failed_replica_held_and_shared_blocks_stay_shared() -> None:
    one, two = replica("http://a:1"), replica("http://b:2")
    index = PrefixIndex(1000)
    system = block_keys(body(turns(1)[:1], model="m"), "m", BLOCK)
    index.record(system, one.epoch)
    index.record(system, two.epoch)
    keys = block_keys(body(turns(2), model="m"), "m", BLOCK)
    index.record(keys, one.epoch)
    # `one` refused the next turn while still live: the retry on `two` replaces its claims
    # instead of making the whole conversation shared, so the turn after follows `two`.
    index.record(keys, two.epoch, replacing={one})
    assert index.deepest(keys) == (len(keys), two.epoch)
    assert keys[: len(system) - 1] == system[:-1]
    assert index.deepest(system[:-1]) == (len(system) - 1, None)


def test_the_anchor_is_the_shared_prefix_and_one_block_of_the_conversations_own() -> None:
    one, two = replica("http://a:1"), replica("http://b:2")
    index = PrefixIndex(1000)
    keys = block_keys(body(turns(2), model="m"), "m", BLOCK)
    system = block_keys(body(turns(1)[:1], model="m"), "m", BLOCK)[:-1]
    # Nothing known: the first block names the conversation.
    assert index.anchor(keys) == 1
    # Its system prompt seen on one replica only: the whole prompt, so that new conversations
    # after it spread (and the prompt comes to be known as shared) instead of following it.
    index.record(system, one.epoch)
    assert index.anchor(keys) == len(keys)
    # Seen on two: the shared blocks and the first one past them.
    index.record(system, two.epoch)
    assert index.anchor(keys) == len(system) + 1


def test_entries_never_pass_the_capacity_and_the_oldest_conversation_goes_first() -> None:
    owner = replica()
    index = PrefixIndex(64)
    first = block_keys(body(turns(1), model="m"), "m", BLOCK)
    index.record(first, owner.epoch)
    for _ in range(50):
        unique = b'{"model":"m","prompt":"' + os.urandom(BLOCK * 4).hex().encode() + b'"}'
        index.record(block_keys(unique, "m", BLOCK), owner.epoch)
        assert len(index) <= 64
    assert len(index) == 64
    assert index.deepest(first) == (0, None)


def test_eviction_takes_the_deepest_blocks_first_so_a_prefix_is_never_orphaned() -> None:
    owner = replica()
    keys = block_keys(body(turns(3), model="m"), "m", BLOCK)
    index = PrefixIndex(len(keys))
    index.record(keys, owner.epoch)
    index.record(keys[:3], owner.epoch)  # a shorter prompt sharing the first three blocks
    unique = b'{"model":"m","prompt":"' + b"z" * (BLOCK * 3) + b'"}'
    index.record(block_keys(unique, "m", BLOCK), owner.epoch)
    # The three evicted are the deepest of the long prompt; its shorter prefix is all there.
    present = [key for key in keys if index.deepest([key])[0]]
    assert present == keys[: len(keys) - 3]


def test_memory_per_entry_is_what_the_settings_state_and_stays_flat_at_the_cap() -> None:
    capacity = 160_000
    owner = replica()
    index = PrefixIndex(capacity)
    # Keys as block_keys makes them: full 64-bit hashes.
    keys = (hash((number, b"block")) for number in range(4 * capacity))

    def flood(count: int) -> int:
        for _ in range(count):
            index.record([next(keys)], owner.epoch)
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        # Past the cap, evictions leave the table at its steady size: that is what is stated.
        steady = flood(2 * capacity)
        flooded = flood(2 * capacity)
    finally:
        tracemalloc.stop()
    per_entry = (steady - before) / capacity
    assert abs(per_entry - ENTRY_BYTES) <= ENTRY_BYTES * 0.1, per_entry
    assert len(index) == capacity
    assert abs(flooded - steady) <= capacity * ENTRY_BYTES * 0.05


def test_repr_shows_the_index_state() -> None:
    index = PrefixIndex(10)
    index.record([1, 2], replica().epoch)
    assert repr(index) == "<PrefixIndex [2 of 10 entries]>"
