"""Sans-IO wire layer: strict msgpack decoding, schemas, size caps and signed envelopes.

Nothing here does I/O, and nothing here imports a higher layer of p2pcompute
(only :mod:`p2pcompute.errors`). Every message that crosses the network is
decoded through :func:`decode` with a cap checked *before* msgpack allocates,
validated against a :class:`Schema`, and (for anything a peer claims about
itself) opened with :func:`open_signed`, which checks the Ed25519 signature.
"""

from p2pcompute.wire.codec import Field as Field
from p2pcompute.wire.codec import Schema as Schema
from p2pcompute.wire.codec import decode as decode
from p2pcompute.wire.codec import encode as encode
from p2pcompute.wire.signing import SignedMessage as SignedMessage
from p2pcompute.wire.signing import open_signed as open_signed
from p2pcompute.wire.signing import peer_id_from_public_key as peer_id_from_public_key
from p2pcompute.wire.signing import seal_signed as seal_signed
