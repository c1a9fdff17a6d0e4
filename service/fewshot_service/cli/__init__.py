"""The server's ``fewshot`` subcommands (``serve``, ``keygen``); :mod:`fewshot_common.cli` dispatches to them."""
