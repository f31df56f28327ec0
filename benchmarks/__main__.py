"""``python -m benchmarks [SUITE|all] [--quick] [--out DIR] [--wan SPEC]``.

SUITE is one of stream, allreduce, overlay, tasks, training, wan, growth.

A thin entry point over :mod:`benchmarks.runner` (same options as ``p2pcompute bench``).
"""

import sys

from benchmarks.runner import main

sys.exit(main())
