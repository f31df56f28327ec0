"""Capacity: what a machine offers (GPUs, memory, versions) and the signed adverts that say so.

Everything here is sans-IO except the NVML/``/proc`` probe: the model
(:class:`Capacity`, :class:`GpuInfo`), the probe (:func:`probe_capacity`) and
advert sealing/checking (:func:`make_advert`, :func:`open_advert`). The overlay
publishes adverts and keeps them in its peer table; this package never does I/O
on the network.

Layering: imports :mod:`p2pcompute.wire`, :mod:`p2pcompute.errors` only, so the
overlay (which carries adverts) may import it. Nothing here imports the overlay.
"""

from p2pcompute.capacity.adverts import Advert as Advert
from p2pcompute.capacity.adverts import make_advert as make_advert
from p2pcompute.capacity.adverts import open_advert as open_advert
from p2pcompute.capacity.model import Capacity as Capacity
from p2pcompute.capacity.model import CapacityQuery as CapacityQuery
from p2pcompute.capacity.model import GpuInfo as GpuInfo
from p2pcompute.capacity.model import capacity_from_wire as capacity_from_wire
from p2pcompute.capacity.probe import probe_capacity as probe_capacity
