"""Terminal output shared by the commands: progress bars and end-of-command summaries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import track
from rich.table import Table

console = Console(stderr=True)
T = TypeVar("T")


def progress(items: Sequence[T] | Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """A rich progress bar over `items`; on a non-terminal it prints only the final state."""
    return track(items, description=description, total=total, console=console, transient=False)


def summary(title: str, rows: dict[str, object]) -> None:
    """Print a two-column table of what a command produced and where; a long value (a path, a run id) is folded
    onto more lines, never cut, so that it can still be copied from a narrow terminal."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)
