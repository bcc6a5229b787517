"""The command line answers at once and reports a user's mistake in one line with exit status 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from kvagents.cli import build_parser, main


def test_importing_the_cli_loads_neither_torch_nor_transformers():
    code = ("import sys, kvagents.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def _actions(parser, path="kvagents"):
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")


def test_every_option_has_a_help_text_without_internal_references():
    for path, action in _actions(build_parser()):
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{path}: {action.dest} has no help"
        assert "issue" not in action.help.lower() and "shared/data" not in action.help, (path, action.help)


@pytest.mark.parametrize("argv, expected", [
    (["embed", "/nonexistent/texts.txt", "out.npy"], "does not exist"),
    (["index", "search", "/nonexistent/folder", "query"], "no index at"),
    (["models", "fetch"], "needs a NAME"),
    (["eval", "selection", "--rows", "x:y", "--shard"], "START:END"),
    (["embed", "TEXTS", "out.npy", "--model", "no-such-model-anywhere"], "Unknown model 'no-such-model-anywhere'"),
    (["embed", "TEXTS", "out.npy", "--layers", "a,b"], "--layers"),
    (["train", "probe", "--data", "/nonexistent/rows.jsonl", "--out", "p"], "does not exist"),
    (["train", "probe", "--data", "TEXTS", "--out", "p", "--grader", "fuzzy"], "unknown grader 'fuzzy'"),
    (["train", "probe", "--data", "TEXTS", "--out", "p", "--n", "1"], "n"),
])
def test_user_errors_print_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    argv = [str(texts) if a == "TEXTS" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and err.startswith("error:") and "\n" not in err, err


def test_debug_shows_the_traceback(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    from kvagents.registry import UnknownModelError

    with pytest.raises(UnknownModelError):
        main(["embed", str(texts), "out.npy", "--model", "no-such-model-anywhere", "--debug"])


def test_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--no-such-option"])
    assert e.value.code == 2


def test_thread_setting_is_validated(monkeypatch):
    from kvagents.engine import threads

    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(ValueError, match="KVAGENTS_THREADS='many'"):
        threads.configure_cpu_threads()
    monkeypatch.setenv(threads.ENV, "torch")
    assert threads.configure_cpu_threads() == __import__("torch").get_num_threads()


def test_thread_measurement_picks_the_fastest_count():
    best, timings = threads_measure()
    assert best in timings and timings[best] <= min(timings.values()) * 1.1 + 1e-12


def threads_measure():
    from kvagents.engine.threads import measure_cpu_threads

    return measure_cpu_threads(hidden=64, rows=2, rounds=1, calls=2)
