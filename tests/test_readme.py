"""The README's quickstart runs as written (on the real smollm2-135m)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[:2] == ["./kv demo", "./kv test"]  # line 1 the main job, line 2 the test suite, nothing before
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci  # CI runs the README's test command verbatim


@pytest.mark.real_model
def test_readme_quickstart_runs(capsys):
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README-quickstart", "exec"), ns)
    assert len(ns["result"].samples[0]) == 4
    assert ns["vectors"].shape[0] == 2
    out = capsys.readouterr().out
    assert out.count("torch.Size") == 4


@pytest.mark.real_model
def test_readme_index_snippet_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"## KV embeddings in an index\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README-index", "exec"), ns)
    assert len(ns["index"]) == 3 and (tmp_path / "my.kvx").exists()
    assert capsys.readouterr().out.count("SearchHit(") == 2
