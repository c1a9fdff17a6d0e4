"""Matplotlib for the PNG reports of ``fewshot train``/``report`` and ``fewshot eval --plot``.

Matplotlib is optional (the ``train`` and ``test`` extras have it, the serving install does not),
so it is imported here, on first use, with an error that says how to get it.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install matplotlib (it comes with 'fewshot[train]')"


class PlottingUnavailable(RuntimeError):
    """Matplotlib is not installed."""


def load_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only: no display, safe on servers)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise PlottingUnavailable(f"plots need matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
