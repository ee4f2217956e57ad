"""A pytest plugin for benchmarks/parallel.py: counts forward+backward passes per process.

Loaded with ``-p _count_passes`` (``benchmarks/`` on PYTHONPATH) in the serial run and in
every xdist worker; at the end of the session each process appends its count to the file
named by ``SALIENCY_PASS_LOG``.
"""

from __future__ import annotations

import os

from pytest_saliency import multi
from pytest_saliency.bundled import registry

COUNT = 0


def _counted(run):
    def counted(*args, **kwargs):
        global COUNT
        COUNT += 1  # one batched forward and backward (one chunk of one pass)
        return run(*args, **kwargs)

    return counted


registry.forward_backward = _counted(registry.forward_backward)
multi.forward_backward = _counted(multi.forward_backward)


def pytest_sessionfinish(session):
    log = os.environ.get("SALIENCY_PASS_LOG")
    if log and (COUNT or hasattr(session.config, "workerinput")):
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"{COUNT}\n")
