"""Persistent Ed25519 identities: the key file on disk and the peer id it gives.

The key file is PKCS#8 PEM (unencrypted), written atomically with mode 0600 on
first use. A file that group or others can read is refused: a leaked key lets
anyone impersonate the peer, sign its adverts and receipts, and read its data lane.

Imports :mod:`p2pcompute.errors`, :mod:`p2pcompute.wire` and ``p2pcompute._fsutil`` only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pcompute._fsutil import atomic_write
from p2pcompute.errors import KeyFileError
from p2pcompute.wire.signing import peer_id_from_public_key

KEY_FILE_MODE = 0o600


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and every missing parent with mode 0700 (``mkdir(parents=True)`` would make the
    parents with the umask's mode, usually 0755); folders that exist are left as they are."""
    missing = []
    for d in (folder, *folder.parents):
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile by someone else
        else:
            os.chmod(d, 0o700)  # mkdir's mode is masked by the umask


class Identity:
    """An Ed25519 key pair and the libp2p peer id it gives.

    Example::

        ident = Identity.load_or_create("~/.p2pcompute/peer.key")
        print(ident.peer_id)           # 12D3KooW..., the same after every restart
        sig = ident.sign(b"hello")
    """

    __slots__ = ("_private", "peer_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (not saved anywhere)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity whose 32-byte Ed25519 private seed is ``seed`` (deterministic; for tests)."""
        if len(seed) != 32:
            raise KeyFileError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Load an identity from a key file; refuse one readable by group or others."""
        p = Path(path).expanduser()
        try:
            st = p.stat()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {p} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable "
                f"by group or others (run: chmod 600 {p})"
            )
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"key file {p} is not a PEM Ed25519 private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"key file {p} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key file at ``path``, creating it (mode 0600) when it does not exist."""
        p = Path(path).expanduser()
        if p.exists() or p.is_symlink():
            return cls.load(p)
        ident = cls.generate()
        ident.save(p)
        return ident

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to ``path`` atomically with mode 0600, creating parent folders (0700)."""
        p = Path(path).expanduser()
        try:
            _make_private_dirs(p.parent)
            atomic_write(p, self.private_pem(), mode=KEY_FILE_MODE)
        except OSError as exc:
            raise KeyFileError(f"cannot write key file {p}: {exc.strerror}") from None

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def seed(self) -> bytes:
        """The raw 32-byte private seed (for handing the key to py-libp2p)."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` (64 bytes)."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
