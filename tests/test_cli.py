import pytest

from kvagents.cli import build_parser, main


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["embed", "--help"], ["models", "--help"],
                                  ["eval", "selection", "--help"], ["index", "build", "--help"],
                                  ["index", "search", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-0.5b" in out


def test_bad_rows_spec(capsys):
    assert main(["eval", "selection", "--rows", "a:b", "--shard"]) == 2
    assert "START:END" in capsys.readouterr().err


@pytest.mark.real_model
def test_index_build_and_search_end_to_end(tmp_path, capsys, smollm):
    """`kvagents index build` then `search`: a stored text finds itself first; hits equal a NumPy brute force."""
    import json

    import numpy as np

    from kvagents import KVIndex, KVPooling

    rows = [{"text": t, "key": f"k{i}", "group": i % 2} for i, t in enumerate(
        ["The cat sat on the mat.", "Paris is the capital of France.", "Add 3 and 4 to get 7.",
         "Photosynthesis turns light into sugar.", "A train leaves at noon.", "Dogs bark at night."])]
    src = tmp_path / "texts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    folder = tmp_path / "idx"
    assert main(["index", "build", str(src), str(folder), "--model", "smollm2-135m", "--id-field", "key",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(folder), rows[2]["text"], "-k", "3", "--json", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"] == "k2" and abs(hits[0]["score"] - 1.0) < 1e-4
    assert hits[0]["metadata"] == {"key": "k2", "group": 0}
    vecs = smollm.embed([r["text"] for r in rows], KVPooling()).numpy()  # independent: the engine's embed
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    order = np.argsort(-(vecs @ vecs[2]))[:3]
    assert [h["id"] for h in hits] == [rows[j]["key"] for j in order]
    np.testing.assert_allclose([h["score"] for h in hits], (vecs @ vecs[2])[order], atol=1e-4)
    assert main(["index", "search", str(folder), "cats", "-k", "5", "--filter", "group=1", "--json",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    assert {h["metadata"]["group"] for h in json.loads(capsys.readouterr().out)} == {1}
    assert main(["index", "search", str(folder), "cats", "-k", "2", "--dtype", "float32", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("| rank | score | id | text |")
    assert len(KVIndex.load(folder / "index.kvx")) == 6
    capsys.readouterr()
    assert main(["index", "search", str(tmp_path / "nowhere"), "q"]) == 2
    assert "no index" in capsys.readouterr().err
