import pytest

from kvagents.cli import build_parser, main


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["embed", "--help"], ["models", "--help"],
                                  ["eval", "selection", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-0.5b" in out


def test_bad_rows_spec():
    with pytest.raises(SystemExit, match="START:END"):
        main(["eval", "selection", "--rows", "a:b", "--shard"])
