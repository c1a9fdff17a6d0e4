"""The server keeps large freed buffers for reuse (core/malloc_tuning.py): a thread that frees
and allocates pixel-sized buffers again no longer faults their pages in every time. Each case
runs in a fresh interpreter, as the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# A bulk request's pattern on a thread other than the main one (the server's request threads):
# its decode jobs' pixels (7 MiB each) alive together until the request ends, then all freed;
# 30 jobs. Prints that thread's minor page faults.
SCRIPT = """
import resource, sys, threading
if sys.argv[1] == "tuned":
    from fewshot_service.core.malloc_tuning import reuse_freed_buffers
    assert reuse_freed_buffers()
faults = []
def requests():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    alive = []
    for _ in range(30):
        alive.append(bytearray(7 << 20))
        if len(alive) > 4:
            alive.clear()
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=requests)
thread.start()
thread.join()
print(faults[0])
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_freed_pixel_buffers_are_reused_without_faulting_their_pages_again() -> None:
    pages = (7 << 20) // 4096
    default, tuned = page_faults("default"), page_faults("tuned")
    assert default >= 20 * pages, default  # glibc's default: fresh pages for most of the 30 jobs
    assert tuned <= 6 * pages, tuned  # tuned: the pages of the first request's peak, reused
