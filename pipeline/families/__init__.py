"""Supported pipeline families, one file each: the registry.

Every module of this package other than ``base`` is a family: it sets ``FAMILY`` to a
``base.Family`` subclass whose ``pipeline_classes`` name the diffusers pipeline classes it
serves. Adding a family is adding a file; nothing else in gen names a family.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from pipeline.families.base import CfgConvention, Conditioning, Family

__all__ = ["CfgConvention", "Conditioning", "Family", "UnsupportedPipelineError", "families",
           "family_class", "family_for"]  # fmt: skip


class UnsupportedPipelineError(ValueError):
    """The loaded pipeline class has no family."""


@cache
def families() -> dict[str, type[Family]]:
    """Pipeline class name -> family class, over every family module of this package.

    Raises:
        RuntimeError: two families claim one pipeline class, or a module sets no FAMILY.
    """
    found: dict[str, type[Family]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if family is None:
            raise RuntimeError(f"{module.__name__} defines no FAMILY")
        for cls in family.pipeline_classes:
            if cls in found:
                raise RuntimeError(f"{cls} is claimed by {found[cls].__name__} and {family.__name__}")
            found[cls] = family
    return found


def family_class(pipeline_class: str) -> type[Family]:
    """The family serving a pipeline class name (``model_index.json``'s ``_class_name``).

    Raises:
        UnsupportedPipelineError: no family serves it; the message lists those that are.
    """
    known = families()
    if pipeline_class not in known:
        raise UnsupportedPipelineError(
            f"pipeline class {pipeline_class} is not supported; supported: {', '.join(sorted(known))}"
        )
    return known[pipeline_class]


def family_for(pipe: Any) -> Family:
    """The family adapter of a loaded pipeline.

    Raises:
        UnsupportedPipelineError: the class is not supported; the message lists those that are.
    """
    return family_class(type(pipe).__name__)(pipe)
