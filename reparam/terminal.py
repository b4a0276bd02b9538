"""Output that reads at any width, in a terminal or a pipe: wrapped paragraphs, tables that fold instead of cutting.

Every table of the command line is made by :func:`table`, whose columns fold a value that does not fit onto the
next line (a module path is shown whole, never cut with an ellipsis), and every long sentence by :func:`paragraph`,
which breaks between words only and indents the continuation lines.  The width is the terminal's, else
``$COLUMNS``, else 80 (what :class:`rich.console.Console` uses too).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from typing import IO

from rich.console import Console
from rich.table import Table

__all__ = ["width", "make_console", "table", "paragraph", "wrap"]

DEFAULT_WIDTH = 80


def width(file: IO | None = None) -> int:
    """Columns available on ``file`` (default stdout): ``$COLUMNS`` if set, the terminal's, else 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    file = file or sys.stdout
    try:
        if file.isatty():
            return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    except (AttributeError, ValueError, OSError):
        pass
    return DEFAULT_WIDTH


def make_console(file: IO, stderr: bool = False) -> Console:
    """A rich console on ``file`` of :func:`width` columns (no markup surprises in pipes: colours only on a tty)."""
    return Console(file=file, stderr=stderr, width=width(file))


def table(title: str | None, *columns: str | tuple[str, str], compact: bool = False) -> Table:
    """A table whose cells fold (wrap at words, then split a long word) rather than end in "…".

    ``columns`` are names, or ``(name, justify)`` pairs.  ``compact``: no vertical rules and one space between
    columns, for tables of many narrow numeric columns (10 of them still fit 80 columns).
    """
    from rich import box

    options = (
        {"box": box.SIMPLE_HEAD, "padding": (0, 1), "pad_edge": False, "collapse_padding": True} if compact else {}
    )
    result = Table(title=title, title_justify="left", expand=False, **options)
    for column in columns:
        name, justify = (column, "left") if isinstance(column, str) else column
        result.add_column(name, justify=justify, overflow="fold")
    return result


def wrap(text: str, columns: int, indent: str = "  ") -> list[str]:
    """``text`` broken between words into lines of at most ``columns``, continuation lines indented.

    A word (a path) is never split, unless it is longer than a whole line: then it continues on the next line,
    every character kept.
    """
    return textwrap.wrap(
        text, width=max(20, columns), subsequent_indent=indent, break_long_words=True, break_on_hyphens=False
    ) or [""]


def paragraph(console: Console, text: str, indent: str = "  ") -> None:
    """Print ``text`` wrapped to the console's width with a hanging ``indent`` (plain text, no markup)."""
    for line in wrap(text, console.width, indent):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
