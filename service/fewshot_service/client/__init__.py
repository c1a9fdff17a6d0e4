"""Former home of the Python client, kept so ``from fewshot_service.client import ...`` still works:
the client is :mod:`fewshot_client` now (its own small distribution, ``service/client/``), and
these are its very objects. New code imports ``fewshot_client``.

The names are the client's own ``__all__``, not a second list: whatever the client exports, this
path exports too (a list kept here by hand had to be edited beside every new client name).
"""

import fewshot_client
from fewshot_client import *  # noqa: F403 (the client's __all__, re-exported as it is)

__all__ = list(fewshot_client.__all__)
