"""Prompt files as users write them: encodings, line numbers and every bad record named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raygrpo.config import DataConfig
from raygrpo.data.prompts import PromptFileError, load_prompts

from .conftest import run_main


def _load(path: Path) -> list[str]:
    return load_prompts(DataConfig(prompt_file=str(path)))


def _error(path: Path) -> str:
    with pytest.raises(PromptFileError) as info:
        _load(path)
    return str(info.value)


# ------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_latin1_byte_is_reported_at_its_line_and_column(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    lines = ["a cat", "a dog"] if suffix == ".txt" else [json.dumps({"prompt": "a cat"}), json.dumps({"prompt": "a dog"})]
    # "café" in Latin-1 on line 3: é is the single byte 0xe9, which UTF-8 never allows before a space.
    third = "caf\xe9 au lait" if suffix == ".txt" else '{"prompt": "caf\xe9"}'
    path.write_bytes("\n".join(lines).encode() + b"\n" + third.encode("latin-1") + b"\n")
    column = 4 if suffix == ".txt" else 16  # 1-based byte column of 0xe9
    assert _error(path).startswith(f"data.prompt_file {str(path)!r} line 3: not UTF-8 text (byte 0xe9 at column {column}")


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa cat\r\nna\xc3\xafve art\r\n")
    assert _load(tmp_path / "p.txt") == ["a cat", "na\u00efve art"]
    (tmp_path / "p.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a cat"}\r\n')
    assert _load(tmp_path / "p.jsonl") == ["a cat"]


def test_utf16_files_are_named_as_not_utf8(tmp_path):
    (tmp_path / "bom.txt").write_bytes("a cat\n".encode("utf-16"))  # with a byte-order mark
    assert "line 1: not UTF-8 text (the file starts with a UTF-16 byte-order mark)" in _error(tmp_path / "bom.txt")
    # Without a mark every ASCII character gains a NUL byte: valid UTF-8, but not text.
    (tmp_path / "nobom.txt").write_bytes("a cat\na dog\n".encode("utf-16-le"))
    assert "line 1: not UTF-8 text (it holds a NUL character" in _error(tmp_path / "nobom.txt")


def test_lines_break_only_at_newlines(tmp_path):
    """U+2028 and U+0085 are valid inside a JSON string and a prompt; splitlines() would cut the record there."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one\u2028two"}\n{"prompt": "three\u0085four"}\n{"prompt": 5}\n', encoding="utf-8")
    assert "line 3:" in _error(path)  # the line an editor shows, not 5
    path.write_text('{"prompt": "one\u2028two"}\n', encoding="utf-8")
    assert _load(path) == ["one\u2028two"]
    (tmp_path / "p.txt").write_text("a\x0cb\nc\n", encoding="utf-8")
    assert _load(tmp_path / "p.txt") == ["a\x0cb", "c"]


# ------------------------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{'prompt': 'a cat'}", "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ('["a cat"]', 'line 2: each line must be an object with a "prompt" string, e.g. {"prompt": "a cat", "image": "cat.png"} '
         "(image optional); this one is a JSON array"),
        ('"a cat"', "line 2: each line must be an object with a \"prompt\" string, e.g. "),
        ('{"text": "a cat", "id": 3}', 'this one has no "prompt" key (its keys: id, text)'),
        ('{"prompt": null}', 'line 2: each line must be an object with a "prompt" string, e.g. '),
        ('{"prompt": null}', "this one's \"prompt\" is null"),
        ('{"prompt": 7}', "this one's \"prompt\" is number"),
    ],
)  # fmt: skip
def test_bad_jsonl_line_is_named(tmp_path, line, says):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    message = _error(path)
    assert message.startswith(f"data.prompt_file {str(path)!r} line 2: ") and says in message, message


def test_blank_prompts_are_skipped_but_a_file_of_none_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "  a cat "}\n\n{"prompt": "   "}\n')
    assert _load(path) == ["a cat"]
    for name, content in [("empty.txt", b""), ("blank.txt", b" \n\t\r\n\n"), ("blank.jsonl", b'{"prompt": ""}\n')]:
        (tmp_path / name).write_bytes(content)
        path = tmp_path / name
        assert _error(path) == f"data.prompt_file: {str(path)!r} holds no prompts (it is empty or every prompt is blank)"


def test_structured_files_under_other_suffixes_are_refused(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a cat"}]))
    assert "looks like a JSON document; use .txt (one prompt per line), .jsonl" in _error(path)


def test_inline_prompts_are_stripped_and_must_not_be_blank():
    assert load_prompts(DataConfig(prompts=[" a cat ", "a dog"])) == ["a cat", "a dog"]
    with pytest.raises(PromptFileError, match=r"data.prompts: entries \[1\] are empty"):
        load_prompts(DataConfig(prompts=["a cat", "  "]))


def test_parquet_prompt_column_problems(tmp_path):
    def write(name, table):
        pq.write_table(table, tmp_path / name)
        return tmp_path / name

    assert "has no 'prompt' column (columns: ['caption'])" in _error(write("a.parquet", pa.table({"caption": ["a cat"]})))
    assert "the 'prompt' column holds int64, not strings" in _error(write("b.parquet", pa.table({"prompt": [1, 2]})))
    message = _error(write("c.parquet", pa.table({"prompt": ["a cat", None, "a dog", None]})))
    assert "rows [1, 3]: the prompt is null (2 of 4 rows)" in message
    (tmp_path / "d.parquet").write_bytes(b"prompt\na cat\n")  # a CSV renamed
    assert "cannot be read as Parquet" in _error(tmp_path / "d.parquet")
    # pandas categoricals arrive dictionary-encoded; other columns are not read at all
    categorical = pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()
    assert _load(write("e.parquet", pa.table({"prompt": categorical, "score": [1.0, 2.0, 3.0]}))) == ["a cat", "a dog", "a cat"]


# ------------------------------------------------------------------------------- through the command line


def test_cli_exits_2_naming_file_and_line_before_ray_starts(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a cat\n\na d\xf6g\n")  # Latin-1 "ö" on line 3
    output_root = tmp_path / "runs"
    proc = run_main("cluster/tiny.yaml", "data.prompts=null", f"data.prompt_file={bad}", f"run.output_root={output_root}")
    assert proc.returncode == 2, proc.stderr
    # Libraries may warn on stderr first (transformers without torchvision): read from raygrpo's own message.
    ours = proc.stderr[proc.stderr.index("raygrpo: cannot start this run:") :].splitlines()
    assert ours[1].startswith(f"  - data.prompt_file {str(bad)!r} line 3: not UTF-8 text (byte 0xf6 at column 4"), proc.stderr
    assert "Ray" not in proc.stderr and not output_root.exists(), "preflight must fail before Ray starts or a run folder exists"
