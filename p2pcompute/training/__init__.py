"""Training across peers: DiLoCo, elastic state sync, checkpoints and the synchronous Swarm facade.

Uses :mod:`p2pcompute.collective` (averaging), :mod:`p2pcompute.overlay` (the node and its
streams), :mod:`p2pcompute.wire`, :mod:`p2pcompute.identity` and torch. Nothing below
imports this package; :mod:`p2pcompute.cli` may.
"""

from p2pcompute.training.averager import Averager as Averager
from p2pcompute.training.averager import AveragingOutcome as AveragingOutcome
from p2pcompute.training.averager import SoloAverager as SoloAverager
from p2pcompute.training.diloco import DiLoCo as DiLoCo
from p2pcompute.training.diloco import StepReport as StepReport
from p2pcompute.training.diloco import TrainingAlone as TrainingAlone
from p2pcompute.training.state import CheckpointError as CheckpointError
from p2pcompute.training.state import TrainingState as TrainingState
from p2pcompute.training.state import load_checkpoint as load_checkpoint
from p2pcompute.training.state import save_checkpoint as save_checkpoint
from p2pcompute.training.swarm import CollectiveAverager as CollectiveAverager
from p2pcompute.training.swarm import DuplicateIdentity as DuplicateIdentity
from p2pcompute.training.swarm import JoinFailed as JoinFailed
from p2pcompute.training.swarm import Swarm as Swarm
