"""The public surface: everything p2pcompute exports resolves, and nothing private leaks."""

from __future__ import annotations

import p2pcompute


def test_every_public_name_resolves() -> None:
    for name in p2pcompute.__all__:
        assert getattr(p2pcompute, name) is not None, name
        assert not name.startswith("_")


def test_errors_share_one_base() -> None:
    for name in p2pcompute.__all__:
        obj = getattr(p2pcompute, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, p2pcompute.P2PComputeError), name


def test_remote_errors_name_the_peer() -> None:
    err = p2pcompute.MalformedMessage("bad advert", peer="12D3KooWExample")
    assert err.peer == "12D3KooWExample"
    assert "12D3KooWExample" in str(err)
    assert isinstance(err, p2pcompute.RemoteProtocolError)
