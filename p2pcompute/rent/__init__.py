"""Rent a swarm: find GPUs by capacity, lease them by negotiation, train on them, verify, pay.

Owns: recipes (operator-registered code that builds a model, its loss and inner optimizer
from a msgpack-able config), the training segment (H inner steps and their pseudo-gradient),
the provider's worker (recipes sold as ``train/<recipe>`` task kinds, with a per-session
state cache) and the requester's :class:`RentJob` (recruiting, segments, verification,
DiLoCo's outer step, reports). See docs/rent.md and docs/design/rent.md.

May import :mod:`p2pcompute.tasks`, :mod:`p2pcompute.tensors`, :mod:`p2pcompute.overlay`,
:mod:`p2pcompute.capacity`, :mod:`p2pcompute.wire` and :mod:`p2pcompute.errors`; nothing
below imports it.
"""

from p2pcompute.rent.facade import Renter as Renter
from p2pcompute.rent.job import Evidence as Evidence
from p2pcompute.rent.job import OuterReport as OuterReport
from p2pcompute.rent.job import RentJob as RentJob
from p2pcompute.rent.job import RentOptions as RentOptions
from p2pcompute.rent.job import SegmentRecord as SegmentRecord
from p2pcompute.rent.recipes import Field as Field
from p2pcompute.rent.recipes import Recipe as Recipe
from p2pcompute.rent.recipes import RecipeBook as RecipeBook
from p2pcompute.rent.recipes import builtin_book as builtin_book
from p2pcompute.rent.recipes import builtin_recipes as builtin_recipes
from p2pcompute.rent.worker import SessionCache as SessionCache
from p2pcompute.rent.worker import TrainingWorker as TrainingWorker
from p2pcompute.rent.worker import kind_of as kind_of
from p2pcompute.rent.worker import training_registry as training_registry

__all__ = [
    "Evidence",
    "Field",
    "OuterReport",
    "Recipe",
    "RecipeBook",
    "RentJob",
    "RentOptions",
    "Renter",
    "SegmentRecord",
    "SessionCache",
    "TrainingWorker",
    "builtin_book",
    "builtin_recipes",
    "kind_of",
    "training_registry",
]
