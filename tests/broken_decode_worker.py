"""A decode worker that reads its job as the real one does, then answers out of protocol, the way
given by FEWSHOT_BROKEN_REPLY (test_decode_isolation.py): what a bug, or a decoder an image
subverted, could send back. Run as the real worker is: ``python -m broken_decode_worker PROGRESS_FD
OUTPUT_FD``."""

from __future__ import annotations

import os
import sys

from fewshot_service.core.decode_isolation import MAX_OUTPUT_BYTES
from fewshot_service.core.decode_worker import _FRAME, read_frame, write_frame

REPLIES = {
    "a payload in the reply": lambda out: write_frame(out, {"t": "ok", "output_bytes": 0}, b"pixels"),
    "a header that is not JSON": lambda out: _raw(out, b"\xff{not json"),
    "a header that is not an object": lambda out: _raw(out, b"[1, 2]"),
    "an output over the bound": lambda out: write_frame(
        out, {"t": "ok", "output_bytes": MAX_OUTPUT_BYTES + 1}
    ),
    "less output than it says": lambda out: write_frame(
        out, {"t": "ok", "output_bytes": 1 << 20, "shape": []}
    ),
    "an error of no known kind": lambda out: write_frame(out, {"t": "error", "kind": "SystemExit"}),
    "an image error without an index": lambda out: write_frame(out, {"t": "error", "kind": "ImageError"}),
    "a batch of the wrong shape": lambda out: write_frame(out, {"t": "ok", "output_bytes": 0, "shape": [1]}),
}


def _raw(out, header: bytes) -> None:  # type: ignore[no-untyped-def]
    out.write(_FRAME.pack(len(header), 0) + header)
    out.flush()


def main() -> None:
    os.ftruncate(int(sys.argv[2]), 0)  # the output file holds nothing, whatever the reply says
    reply = REPLIES[os.environ["FEWSHOT_BROKEN_REPLY"]]
    inp, out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    while read_frame(inp) is not None:
        reply(out)


if __name__ == "__main__":
    main()
