"""Task negotiation, receipts and the ledger: selling and buying GPU work among peers.

Owns: the task registry (kinds a provider serves), the sans-IO negotiation cores
(request -> offers -> accept -> lease with heartbeats -> result | error | cancel |
expiry), their wire messages, dual-signed receipts, the hash-chained ledger, and
the trio driver that runs the cores on a :class:`p2pcompute.overlay.Node`.

May import :mod:`p2pcompute.wire`, :mod:`p2pcompute.identity`, :mod:`p2pcompute.overlay`,
:mod:`p2pcompute.tensors` and :mod:`p2pcompute.errors`; never ``collective``, ``training`` or ``cli``.
"""

# Names load on first use: `p2pcompute ledger verify` must not pay for torch and py-libp2p.
from typing import TYPE_CHECKING

_EXPORTS = {
    "MATMUL": "p2pcompute.tasks.builtin",
    "MATMUL_BENCH": "p2pcompute.tasks.builtin",
    "builtin_registry": "p2pcompute.tasks.builtin",
    "verify_matmul_bench": "p2pcompute.tasks.builtin",
    "TaskResult": "p2pcompute.tasks.driver",
    "TaskService": "p2pcompute.tasks.driver",
    "open_tasks": "p2pcompute.tasks.driver",
    "serve_tasks": "p2pcompute.tasks.driver",
    "Ledger": "p2pcompute.tasks.ledger",
    "LedgerCorrupt": "p2pcompute.tasks.ledger",
    "LedgerReport": "p2pcompute.tasks.ledger",
    "summarise": "p2pcompute.tasks.ledger",
    "verify_ledger": "p2pcompute.tasks.ledger",
    "Resources": "p2pcompute.tasks.messages",
    "JobSpec": "p2pcompute.tasks.negotiation",
    "ProviderConfig": "p2pcompute.tasks.negotiation",
    "Receipt": "p2pcompute.tasks.receipts",
    "open_receipt": "p2pcompute.tasks.receipts",
    "tensor_digest": "p2pcompute.tasks.receipts",
    "TaskError": "p2pcompute.tasks.registry",
    "TaskRegistry": "p2pcompute.tasks.registry",
    "UnknownTaskKind": "p2pcompute.tasks.registry",
    "load_registry": "p2pcompute.tasks.registry",
}

if TYPE_CHECKING:
    from p2pcompute.tasks.builtin import MATMUL as MATMUL
    from p2pcompute.tasks.builtin import MATMUL_BENCH as MATMUL_BENCH
    from p2pcompute.tasks.builtin import builtin_registry as builtin_registry
    from p2pcompute.tasks.builtin import verify_matmul_bench as verify_matmul_bench
    from p2pcompute.tasks.driver import TaskResult as TaskResult
    from p2pcompute.tasks.driver import TaskService as TaskService
    from p2pcompute.tasks.driver import open_tasks as open_tasks
    from p2pcompute.tasks.driver import serve_tasks as serve_tasks
    from p2pcompute.tasks.ledger import Ledger as Ledger
    from p2pcompute.tasks.ledger import LedgerCorrupt as LedgerCorrupt
    from p2pcompute.tasks.ledger import LedgerReport as LedgerReport
    from p2pcompute.tasks.ledger import summarise as summarise
    from p2pcompute.tasks.ledger import verify_ledger as verify_ledger
    from p2pcompute.tasks.messages import Resources as Resources
    from p2pcompute.tasks.negotiation import JobSpec as JobSpec
    from p2pcompute.tasks.negotiation import ProviderConfig as ProviderConfig
    from p2pcompute.tasks.receipts import Receipt as Receipt
    from p2pcompute.tasks.receipts import open_receipt as open_receipt
    from p2pcompute.tasks.receipts import tensor_digest as tensor_digest
    from p2pcompute.tasks.registry import TaskError as TaskError
    from p2pcompute.tasks.registry import TaskRegistry as TaskRegistry
    from p2pcompute.tasks.registry import UnknownTaskKind as UnknownTaskKind
    from p2pcompute.tasks.registry import load_registry as load_registry


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pcompute.tasks' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
