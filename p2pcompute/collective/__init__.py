"""Fault-tolerant collective averaging: matchmaking and all-reduce that say what happened.

Public surface: :func:`open_collective` / :class:`Collective` (form a group under a run name,
average tensors in place, by weighted mean or a robust :class:`Aggregator`),
:class:`RoundOutcome` / :class:`RoundStatus` (who took part, who was
excluded; never success for a partial average), :class:`Timeouts`, :func:`tensors_layout`, and
the sans-IO cores (:mod:`~p2pcompute.collective.roundcore`, :mod:`~p2pcompute.collective.matchcore`,
:mod:`~p2pcompute.collective.plan`) for direct use and testing.

Uses :mod:`p2pcompute.overlay` (Node streams and topics), :mod:`p2pcompute.tensors` (the data
lane and its codecs), :mod:`p2pcompute.wire` and :mod:`p2pcompute.errors`; nothing above them.
"""

from p2pcompute.collective.aggregate import AGGREGATORS as AGGREGATORS
from p2pcompute.collective.aggregate import Aggregator as Aggregator
from p2pcompute.collective.matchcore import Candidate as Candidate
from p2pcompute.collective.matchcore import Formed as Formed
from p2pcompute.collective.matchcore import NoGroup as NoGroup
from p2pcompute.collective.matchcore import partition as partition
from p2pcompute.collective.roundcore import RoundOutcome as RoundOutcome
from p2pcompute.collective.roundcore import RoundStatus as RoundStatus
from p2pcompute.collective.roundcore import Timeouts as Timeouts
from p2pcompute.collective.service import CODECS as CODECS
from p2pcompute.collective.service import Collective as Collective
from p2pcompute.collective.service import open_collective as open_collective
from p2pcompute.collective.service import tensors_layout as tensors_layout

__all__ = [
    "AGGREGATORS",
    "CODECS",
    "Aggregator",
    "Candidate",
    "Collective",
    "Formed",
    "NoGroup",
    "RoundOutcome",
    "RoundStatus",
    "Timeouts",
    "open_collective",
    "partition",
    "tensors_layout",
]
