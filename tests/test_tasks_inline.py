"""Small tensors ride inside their ``task-tensors`` header (v2 ``inline``); the receiver checks
the inline bytes against the announced dtypes and shapes before using them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pcompute.errors import LocalProtocolError, MalformedMessage
from p2pcompute.tasks.frames import inline_frame, recv_tensors, send_tensors
from p2pcompute.tasks.messages import INLINE_FRAME, INLINE_TENSORS, TENSORS_HEADER


class OneFrame:
    """Records the frames sent; serves none (an inline header needs no further frame)."""

    peer = "12D3KooWPeer"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_frame(self, data: Any) -> None:
        self.sent.append(bytes(data))

    async def recv_frame(self, cap: int | None = None) -> bytes:
        raise AssertionError("an inline header is the only frame")


async def test_small_tensors_travel_in_one_frame() -> None:
    s = OneFrame()
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(3, dtype=torch.bfloat16),
    }
    await send_tensors(s, tensors)  # type: ignore[arg-type]
    assert len(s.sent) == 1
    out = await recv_tensors(s, s.sent[0], cap=1 << 20, touch=lambda: None)  # type: ignore[arg-type]
    assert set(out) == {"a", "b"}
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize(
    ("inline", "nbytes"),
    [(b"\x00" * 8, 16), (b"\x00" * 20, 16), (b"", 16)],
    ids=["short", "long", "missing"],
)
async def test_inline_bytes_must_match_the_header(inline: bytes, nbytes: int) -> None:
    raw = TENSORS_HEADER.build(names=["a"], dtypes=["float32"], shapes=[[4]], nbytes=nbytes, inline=inline)
    with pytest.raises(MalformedMessage):
        await recv_tensors(OneFrame(), raw, cap=1 << 20, touch=lambda: None)  # type: ignore[arg-type]


async def test_inline_is_capped() -> None:
    too_big = INLINE_TENSORS + 4
    with pytest.raises(LocalProtocolError):  # the schema refuses to build it
        TENSORS_HEADER.build(
            names=["a"], dtypes=["uint8"], shapes=[[too_big]], nbytes=too_big, inline=b"\0" * too_big
        )


def test_inputs_and_outputs_fit_inside_the_accept_and_the_result() -> None:
    """A small task's inputs travel inside its accept, its outputs inside its result; big ones
    (and none) do not."""
    small = inline_frame({"a": torch.ones(2, 2), "b": torch.ones(2, 2)})
    assert 0 < len(small) <= INLINE_FRAME
    assert inline_frame({"a": torch.ones(INLINE_TENSORS // 4 + 1)}) == b""
    assert inline_frame({}) == b""
