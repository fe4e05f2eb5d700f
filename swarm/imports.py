"""A user's own code named as ``package.module:callable`` (model factories, data factories, loss
functions): imported with every failure in one line naming what was asked for."""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from swarm.errors import SwarmError

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def describe(e: BaseException) -> str:
    """An exception in one line: its type and (the first 200 characters of) its message."""
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def import_callable(path: str, what: str = "model factory") -> Callable[..., Any]:
    """The callable ``path`` (``package.module:name``) names; ``what`` it is for the error lines."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SwarmError(f"{what} import path '{path}' must look like package.module:{what.split()[-1]}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SwarmError(f"cannot import {what.split()[0]} module '{module_name}': {e}") from None
    except BaseException as e:   # its top level raised (SystemExit, a bug): the user's code, not ours
        raise SwarmError(f"importing {what.split()[0]} module '{module_name}' raised {describe(e)}") from None
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise SwarmError(f"module '{module_name}' has no attribute '{attr}'") from None
    if not callable(found):
        raise SwarmError(f"{what} '{path}' is not callable")
    return found
