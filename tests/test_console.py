"""Terminal output: end-of-command summaries keep every value whole."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from rnnlab import console


def test_a_summary_folds_a_long_value_in_a_narrow_terminal_instead_of_cutting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=out, width=40, color_system=None))
    path = "/home/someone/projects/rnnlab/models/speech/lstm_tuned/seed42/model.ckpt"
    console.summary("speech x lstm", {"model": path, "MLflow run": "0123456789abcdef0123456789abcdef"})
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 40
    assert "…" not in text
    joined = "".join(text.replace("│", " ").split())  # the table's cells, read back without borders and folds
    assert path in joined and "0123456789abcdef0123456789abcdef" in joined
