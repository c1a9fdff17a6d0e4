"""How many CPU cores this process may use: the one figure thread budgets are cut from."""

from __future__ import annotations

from loky import cpu_count


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, and a container's CPU quota (cgroup
    v1 or v2), which its affinity mask does not show (``docker run --cpus 2``, a Kubernetes CPU
    limit), rounded up. Counting the host's cores there would give every model run many threads
    on a CPU budget of two."""
    return cpu_count()
