"""Thread-count-invariant linear algebra.

torch's LAPACK calls (`torch.linalg.svd`, `torch.linalg.eigh`) split their work over torch's intra-op
threads, and their float64 results differ in the last digits between 1 and 2 threads (a 128 x 512 SVD:
every factor differs). The matrix products, per-row reductions and training steps the pipeline runs are
the same bits at 1 and 2 threads (tests/unit/test_thread_count.py), so these calls are the ones that
would make a recording depend on the machine's thread count: SVD compression's rank allocation and
reported losses, the privacy mapping's kernel basis. They run on one thread; their matrices are at most
a few hundred wide, where a second thread saves nothing measurable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op pool at one thread while inside, restored after (also on an exception)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
