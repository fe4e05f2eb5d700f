"""The lines the ``swarm`` loggers print (``swarm.logs`` format: ``warning: ...``), as a list a test
reads: ``swarm_lines(caplog)`` over pytest's ``caplog`` (the records captured under ``swarm``,
formatted, oldest first; INFO and up captured from the call on)."""
from __future__ import annotations

import logging

import pytest

from swarm.logs import LineFormatter


class Lines:
    """A live view of the captured lines: ``list(...)``, ``==``, ``[i]``, ``len``, ``in``, ``clear``."""

    def __init__(self, caplog: pytest.LogCaptureFixture, name: str = "swarm"):
        self.caplog, self.name, self.format = caplog, name, LineFormatter().format

    def lines(self) -> list[str]:
        return [self.format(r) for r in self.caplog.records if r.name == self.name or r.name.startswith(self.name + ".")]

    def clear(self) -> None:
        self.caplog.clear()

    def __iter__(self):
        return iter(self.lines())

    def __len__(self) -> int:
        return len(self.lines())

    def __getitem__(self, i):
        return self.lines()[i]

    def __eq__(self, other) -> bool:
        return self.lines() == list(other)

    def __repr__(self) -> str:
        return repr(self.lines())


def swarm_lines(caplog: pytest.LogCaptureFixture) -> Lines:
    caplog.set_level(logging.INFO, logger="swarm")
    return Lines(caplog)
