"""Sans-IO negotiation cores: :class:`ProviderCore` and :class:`RequesterCore`.

Neither core does I/O or reads a clock: the driver feeds them validated messages
and the current time (``now``, seconds on any monotonic clock) and performs the
actions they return (send this, start that run, deliver this item). Everything
here is deterministic, so it is tested with hypothesis on a simulated network
with drops, duplicates, reordering and clock jumps.

Lease life (both sides)::

    requester: PENDING item --accept--> ACCEPTING --grant--> ACTIVE --result--> DONE
                                           |  reject / timeout     | error / expiry / peer gone
                                           +--> item PENDING again (attempt counted) or FAILED
    provider:  offer --accept--> ACTIVE --run ok--> DONE | run failed --> FAILED
                                   | cancel / expiry (no requester heartbeat for lease_ttl)
                                   +--> CANCELLED / EXPIRED (the run is aborted; its slot is
                                        freed only when the run has really stopped)

Invariants (checked by tests/test_negotiation_stateful.py):

* a provider never has more runs in progress than ``capacity``;
* a lease id is granted and run at most once; an item is delivered at most once;
* every lease ends: by result, error, cancel or expiry; a job ends by its deadline.

Accept policy (requester), documented in docs/tasks.md: offers for the job's
request rounds are filtered (kind, price <= max_price, resources >= needs,
provider not excluded, offer still valid, heartbeat compatible) and ranked by
``(price, expected_start, our leases already on that offer, -free slots, provider id)``.
Round 1 collects offers for ``offer_window`` seconds (or until ``enough_offers``
arrived); later rounds (renegotiation) assign as soon as any usable offer arrives.

The code lives in three modules, re-exported here: :mod:`p2pcompute.tasks.actions`
(the actions and outcomes both cores share), :mod:`p2pcompute.tasks.provider_core`
and :mod:`p2pcompute.tasks.requester_core`. Each lease life cycle is a transition
table (:data:`PROVIDER_LEASE`, :data:`REQUESTER_LEASE`), not a chain of ifs.

Imports those three modules only.
"""

from __future__ import annotations

from p2pcompute.tasks.actions import (
    AbortRun as AbortRun,
)
from p2pcompute.tasks.actions import (
    Action as Action,
)
from p2pcompute.tasks.actions import (
    Bounded as Bounded,
)
from p2pcompute.tasks.actions import (
    CloseLease as CloseLease,
)
from p2pcompute.tasks.actions import (
    IdFactory as IdFactory,
)
from p2pcompute.tasks.actions import (
    ItemDone as ItemDone,
)
from p2pcompute.tasks.actions import (
    ItemFailed as ItemFailed,
)
from p2pcompute.tasks.actions import (
    Outcome as Outcome,
)
from p2pcompute.tasks.actions import (
    Publish as Publish,
)
from p2pcompute.tasks.actions import (
    SendAccept as SendAccept,
)
from p2pcompute.tasks.actions import (
    SendCancel as SendCancel,
)
from p2pcompute.tasks.actions import (
    SendError as SendError,
)
from p2pcompute.tasks.actions import (
    SendGrant as SendGrant,
)
from p2pcompute.tasks.actions import (
    SendHeartbeat as SendHeartbeat,
)
from p2pcompute.tasks.actions import (
    SendInputs as SendInputs,
)
from p2pcompute.tasks.actions import (
    SendOffer as SendOffer,
)
from p2pcompute.tasks.actions import (
    SendReject as SendReject,
)
from p2pcompute.tasks.actions import (
    SendResult as SendResult,
)
from p2pcompute.tasks.actions import (
    StartRun as StartRun,
)
from p2pcompute.tasks.actions import (
    random_id as random_id,
)
from p2pcompute.tasks.messages import Offer as Offer
from p2pcompute.tasks.messages import Resources as Resources
from p2pcompute.tasks.messages import TaskRequest as TaskRequest
from p2pcompute.tasks.provider_core import (
    PROVIDER_LEASE as PROVIDER_LEASE,
)
from p2pcompute.tasks.provider_core import (
    KindTerms as KindTerms,
)
from p2pcompute.tasks.provider_core import (
    ProviderConfig as ProviderConfig,
)
from p2pcompute.tasks.provider_core import (
    ProviderCore as ProviderCore,
)
from p2pcompute.tasks.provider_core import (
    ProviderEvent as ProviderEvent,
)
from p2pcompute.tasks.requester_core import (
    REQUESTER_LEASE as REQUESTER_LEASE,
)
from p2pcompute.tasks.requester_core import (
    ItemStatus as ItemStatus,
)
from p2pcompute.tasks.requester_core import (
    JobSpec as JobSpec,
)
from p2pcompute.tasks.requester_core import (
    LeaseEvent as LeaseEvent,
)
from p2pcompute.tasks.requester_core import (
    LeaseState as LeaseState,
)
from p2pcompute.tasks.requester_core import (
    RequesterCore as RequesterCore,
)
from p2pcompute.tasks.requester_core import (
    with_issued as with_issued,
)

__all__ = [
    "PROVIDER_LEASE",
    "REQUESTER_LEASE",
    "AbortRun",
    "Action",
    "Bounded",
    "CloseLease",
    "IdFactory",
    "ItemDone",
    "ItemFailed",
    "ItemStatus",
    "JobSpec",
    "KindTerms",
    "LeaseEvent",
    "LeaseState",
    "Outcome",
    "ProviderConfig",
    "ProviderCore",
    "ProviderEvent",
    "Publish",
    "RequesterCore",
    "SendAccept",
    "SendCancel",
    "SendError",
    "SendGrant",
    "SendHeartbeat",
    "SendInputs",
    "SendOffer",
    "SendReject",
    "SendResult",
    "StartRun",
    "random_id",
    "with_issued",
]
