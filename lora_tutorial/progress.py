"""One-line progress bars that look right in a terminal, in a live notebook and in a *saved* notebook.

In a terminal this is plain ``tqdm`` on stderr. In Jupyter, ``tqdm``'s widget bar saves only its very
first state as the text a reader sees later (a bar frozen at "0/100"), so in a notebook the bar is a line
of text shown with ``IPython.display`` and *updated in place*: the live notebook shows it moving, and the
saved notebook keeps its final state, readable anywhere (GitHub included), no widgets needed.

The trainer's bar (a Lightning callback) is in ``progress_callback.py``: this module does not import
Lightning, so generating text or loading a model does not pay Lightning's import (about 3 s, 150 MiB).
"""

from __future__ import annotations

import io
import sys
from typing import Any

from tqdm.std import tqdm as std_tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is not a terminal and widgets would be needed)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _NotebookLine(std_tqdm):
    """``tqdm`` whose text goes to one IPython display, updated in place (its final state is what is saved)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from IPython.display import display

        self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        super().__init__(*args, file=io.StringIO(), **kwargs)  # every line goes to the display, none to a stream

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        self._handle.update({"text/plain": msg if msg is not None else self.__str__()}, raw=True)
        return True


def progress_bar(iterable: Any = None, **kwargs: Any) -> std_tqdm:
    """``tqdm(iterable, **kwargs)`` for here: plain text in a terminal, an updating line in a notebook."""
    kwargs.setdefault("dynamic_ncols", True)
    if in_notebook():
        kwargs.setdefault("mininterval", 0.5)
        kwargs.pop("dynamic_ncols")
        return _NotebookLine(iterable, ncols=100, **kwargs)
    return std_tqdm(iterable, **kwargs)


__all__ = ["progress_bar", "in_notebook"]
