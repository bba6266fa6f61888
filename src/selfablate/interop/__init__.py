"""Exports to other interpretability libraries (optional extras: `tl`, `hf`)."""

import importlib
from types import ModuleType

from ..errors import SelfAblateError


def optional_import(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SelfAblateError(f"{what} needs `pip install 'selfablate[{extra}]'`: {e}") from None
