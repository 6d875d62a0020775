"""The worker runtime and the three Dragonfly workers.

``python -m backend.workers.<name>`` imports this package first, before the worker's
module: when that is how the process started, a last resort is installed here, so that an
exception nothing caught before logging was configured (an import error in a worker
module, a missing dependency) still ends as one JSON ``WORKER_CRASH`` line, exit 1.
"""

from __future__ import annotations

import sys

if sys.argv[:1] == ["-m"]:  # the package is being imported to find a -m module
    from backend.workers.last_resort import install

    install()
