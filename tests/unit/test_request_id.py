from __future__ import annotations

import re

import pytest

from server.request_id import MAX_LENGTH, accept_or_generate, generate, is_valid


@pytest.mark.parametrize(
    "value",
    [b"abc", b"0f8fad5b-d9cb-469f-a165-70867728950e", b"req.1_2-3", b"A" * MAX_LENGTH],
)
def test_well_formed_ids_are_kept(value: bytes) -> None:
    assert is_valid(value)
    assert accept_or_generate(value) == value.decode()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"has space",
        b"new\nline",
        b'quote"d',
        b"semi;colon",
        b"A" * (MAX_LENGTH + 1),
        "caf\u00e9".encode(),
        b"<script>",
    ],
)
def test_malformed_ids_are_replaced(value: bytes) -> None:
    assert not is_valid(value)
    replaced = accept_or_generate(value)
    assert replaced != value.decode(errors="replace")
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_missing_id_is_generated_and_unique() -> None:
    ids = {accept_or_generate(None) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert is_valid(generate().encode())


def test_forked_workers_do_not_repeat_each_others_ids() -> None:
    import os

    read_end, write_end = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # the child: one id, then out without running pytest's teardown
            os.write(write_end, generate().encode() + b"\n")
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        ids = pipe.read().split()
    assert len(ids) == 2
    assert ids[0] != ids[1]
