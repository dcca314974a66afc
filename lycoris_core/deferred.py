"""Pipeline components loaded only when first needed (text encoders of a cached training run).

A training run whose text embeddings are all in its ``cache_dir`` never calls the text
encoders, and T5-XXL alone is 9.5 GB in bf16. ``load_model(..., defer_text_encoders=True)``
leaves them out of the pipeline and records here how to load each one; everything that encodes
text (the objective's ``encode_text``, ``sample``, a text-encoder patch) calls :func:`ensure`
first, which loads what is missing. No torch or diffusers import here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_ATTR = "_lycoris_deferred"  # on the pipeline object: component name -> loader


def defer(pipe: Any, loaders: dict[str, Callable[[], Any]]) -> None:
    """Record `loaders` (component name -> a function returning the loaded module)."""
    if loaders:
        object.__setattr__(pipe, _ATTR, {**pending(pipe), **loaders})


def pending(pipe: Any) -> dict[str, Callable[[], Any]]:
    """The components of `pipe` not loaded yet."""
    return dict(getattr(pipe, _ATTR, None) or {})


def ensure(pipe: Any) -> list[str]:
    """Load every deferred component of `pipe` into it; returns their names."""
    loaders = pending(pipe)
    for name, load in loaders.items():
        pipe.register_modules(**{name: load()})
        logger.info("loaded the deferred component %s", name)
    if loaders:
        object.__setattr__(pipe, _ATTR, {})
    return list(loaders)
