"""How many CPU cores this process may use: the one figure thread budgets are cut from."""

from __future__ import annotations

from loky import cpu_count


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, and a container's CPU quota (cgroup
    v1 or v2), which its affinity mask does not show (``docker run --cpus 2``, a Kubernetes CPU
    limit), rounded up. Counting the host's cores there would give every model run many threads
    on a CPU budget of two."""
    return cpu_count()


def intra_op_threads_per_batch(cores: int, workers: int) -> int:
    """Engine threads for one model run when ``workers`` batches may run at once on
    ``cores``: an equal share, so the threads of concurrent runs add up to the cores instead of
    each run's threads competing for all of them."""
    return max(1, cores // workers)
