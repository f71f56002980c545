"""``surgeon.load``: model loading, kept importable under its old module name.

The code lives in ``surgeon.loaders`` (one module per source kind behind the ``LOADERS`` table).
``import surgeon; surgeon.load(...)`` is the function: ``surgeon/__init__.py`` imports this module
first, then binds the name to the function.
"""

from __future__ import annotations

from .loaders import *  # noqa: F401,F403
from .loaders import (  # noqa: F401
                      DEFAULT_TEXT,
                      LOADERS,
                      OTHER_TEXTS,
                      PICKLE_SUFFIXES,
                      LoadedModel,
                      __all__,  # noqa: F401
                      load,
                      load_model,
)

_OTHER_TEXTS = OTHER_TEXTS  # the old private name (tests read it)
