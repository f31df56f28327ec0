"""Key files: created 0600, refused when group/world readable, stable peer id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pcompute.errors import KeyFileError
from p2pcompute.identity import Identity
from p2pcompute.overlay.host import libp2p_key_pair


def test_created_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "peer.key"
    first = Identity.load_or_create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    again = Identity.load_or_create(path)
    assert first.peer_id == again.peer_id
    assert first.peer_id.startswith("12D3KooW")
    assert libp2p_key_pair(first).public_key.to_bytes() == first.public_key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "peer.key"
    Identity.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load(path)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError):
        Identity.load(bad)
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path / "missing.key")
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path)


def test_a_short_seed_is_a_typed_error() -> None:
    with pytest.raises(KeyFileError, match="32 bytes"):
        Identity.from_seed(b"short")
