"""Prompt sources (with their conditioning images, for image editing and image-to-video) and the order prompts are
visited in. A prompt's image travels with its group (``PromptGroup.image``): the rollout encodes it with the prompt,
and rewards that judge an output against its source get it as their reference (raygrpo/reward/base.py); evaluation
and the guard read theirs from the same kinds of files (raygrpo/eval.py).

Sources, chosen by ``data.prompts`` / the suffix of ``data.prompt_file``:

- inline ``data.prompts`` or a ``.txt`` file (one prompt per line): text only;
- ``.jsonl``: one JSON object per line, ``{"prompt": str, "image": path}``; ``image`` is optional
  (text-only files leave it out) and a relative path is relative to the .jsonl's folder;
- ``.parquet``: a ``prompt`` column of strings and, optionally, an ``image`` column holding a path
  (as above) or the encoded bytes of a PNG/JPEG (a struct with a ``bytes`` field, as Hugging Face
  datasets store images, works too).

Text files (.txt, .jsonl) must be UTF-8; a leading byte-order mark (Windows editors write one) is
dropped. Lines end at ``\n`` (``\r\n`` too) and nowhere else, so line numbers in errors are the
ones an editor shows. Prompts are stripped of surrounding whitespace and empty ones are skipped, with
their record; a null prompt (JSON ``null``, a Parquet null) is an error, since it is a missing value
rather than a blank line. Every problem raises :class:`PromptFileError` naming the file and the line
(or Parquet row, counted from 0), which the driver's preflight reports before Ray starts.

:func:`load_prompts` returns the prompts; :func:`load_prompt_images` the conditioning images
aligned with them (None for text-only sources), decoded on access so a large data set does not
sit decoded in the driver's memory. Every image is opened and decoded once up front by
:meth:`PromptImages.check`, so a missing or unreadable one stops the run before Ray starts.
"""

from __future__ import annotations

import codecs
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from raygrpo.config import DataConfig


class PromptFileError(ValueError):
    """A prompt source that cannot be used; the message names the file and line (or row) and what to change."""


# Structured formats a user may reasonably try that would be misread as one prompt per line.
_NOT_PROMPT_FILES = {".json": "a JSON document", ".csv": "CSV", ".tsv": "TSV", ".yaml": "YAML", ".yml": "YAML"}
_FORMATS = '.txt (one prompt per line), .jsonl ({"prompt": ...} per line) or .parquet (a "prompt" column)'
_JSONL_RULE = 'each line must be an object with a "prompt" string, e.g. {"prompt": "a cat", "image": "cat.png"} (image optional)'


@dataclass(frozen=True)
class _ImageSource:
    """Where one conditioning image comes from: a file or in-line encoded bytes, plus where it was named (for errors)."""

    where: str  # e.g. "prompts.jsonl line 3"
    path: Path | None = None
    data: bytes | None = None

    def load(self) -> np.ndarray:
        """The image as ``[H, W, 3]`` uint8 RGB; raises PromptFileError naming the record."""
        what = str(self.path) if self.path is not None else "in-line image bytes"
        try:
            with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        except FileNotFoundError:
            raise PromptFileError(f"{self.where}: conditioning image {what!r} does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise PromptFileError(f"{self.where}: conditioning image {what!r} cannot be read as an image ({exc})") from None


class PromptImages:
    """The conditioning images of a data set, aligned with its prompts; ``images[i]`` decodes prompt i's image."""

    def __init__(self, sources: list[_ImageSource]):
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.sources[index].load()  # [H, W, 3] uint8

    def check(self, limit: int = 10) -> None:
        """Decode every image once; raises PromptFileError listing up to ``limit`` bad ones."""
        problems = []
        for source in self.sources:
            try:
                source.load()
            except PromptFileError as exc:
                problems.append(str(exc))
        if problems:
            more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
            raise PromptFileError(
                f"{len(problems)} of {len(self)} conditioning images cannot be used:\n  " + "\n  ".join(problems[:limit]) + more
            )


def load_prompts(data: DataConfig) -> list[str]:
    """Inline prompts, or those of a .txt (one per line, blank lines skipped), .jsonl or .parquet file."""
    if data.prompts is not None:
        empty = [i for i, prompt in enumerate(data.prompts) if not prompt.strip()]
        if empty:
            raise PromptFileError(f"data.prompts: entries {empty[:5]} are empty; remove them or give them text")
        return [prompt.strip() for prompt in data.prompts]
    return [prompt for prompt, _ in _read_records(data.prompt_file)]


def load_prompt_images(data: DataConfig) -> PromptImages | None:
    """The conditioning images aligned with :func:`load_prompts` (``images[i]`` for prompt i), or None for a text-only source.

    A source where some records have an image and others do not is an error: image editing and
    image-to-video need one per prompt. Images are not decoded here; call :meth:`PromptImages.check` for that.
    """
    if data.prompts is not None:
        return None
    records = _read_records(data.prompt_file)
    missing = [i for i, (_, source) in enumerate(records) if source is None]
    if len(missing) == len(records):
        return None
    if missing:
        raise PromptFileError(
            f"data.prompt_file: {data.prompt_file!r} gives a conditioning image for some prompts but not for "
            f"{len(missing)} of them (records {missing[:5]}{' ...' if len(missing) > 5 else ''}); "
            "image editing and image-to-video need one per prompt"
        )
    return PromptImages([source for _, source in records])


def _read_records(prompt_file: str) -> list[tuple[str, _ImageSource | None]]:
    """``(prompt, image source or None)`` per non-empty prompt of the file."""
    path = Path(prompt_file)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise PromptFileError(f"data.prompt_file: {str(path)!r} {what}")
    suffix = path.suffix.lower()
    if suffix in _NOT_PROMPT_FILES:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} looks like {_NOT_PROMPT_FILES[suffix]}; use {_FORMATS}")
    if suffix == ".parquet":
        records = _parquet_records(path)
    elif suffix == ".jsonl":
        records = _jsonl_records(path)
    else:
        records = [(line.strip(), None) for _, line in _text_lines(path)]
    records = [(prompt, image) for prompt, image in records if prompt]
    if not records:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} holds no prompts (it is empty or every prompt is blank)")
    return records


def _where(path: Path, line: int) -> str:
    return f"data.prompt_file {str(path)!r} line {line}"


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` for every line of a UTF-8 file; PromptFileError at the first line that is not UTF-8 text.

    The file is decoded in one go and, on failure, the bad byte's line is found by counting newlines
    before it: linear in the file's size either way.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} cannot be read ({exc.strerror})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise PromptFileError(f"{_where(path, 1)}: not UTF-8 text (the file starts with a UTF-16 byte-order mark); save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # holds no newline, so line numbers stay the editor's
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)  # 1-based byte column
        raise PromptFileError(
            f"{_where(path, line)}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}: {exc.reason}); "
            "save the file as UTF-8, e.g. with `iconv -f <its encoding> -t utf-8`"
        ) from None
    # split("\n"), not splitlines(): that also breaks at U+2028, U+0085, form feeds and other characters a
    # prompt or a JSON string may hold, cutting a record in two and shifting every later line number.
    lines = list(enumerate((line.removesuffix("\r") for line in text.split("\n")), start=1))
    for number, line in lines:
        if "\x00" in line:
            raise PromptFileError(
                f"{_where(path, number)}: not UTF-8 text (it holds a NUL character: UTF-16 without a byte-order mark, "
                "or binary data); save the prompts as UTF-8 text"
            )
    return lines


def _jsonl_records(path: Path) -> list[tuple[str, _ImageSource | None]]:
    records = []
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        where = _where(path, number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); {_JSONL_RULE}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PromptFileError(f"{where}: {_JSONL_RULE}; {_not_a_record(record)}")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise PromptFileError(f'{where}: "image" must be a path (a string), got {_json_type(image)}')
        records.append((record["prompt"].strip(), _path_source(image, path, where) if image else None))
    return records


def _not_a_record(record: object) -> str:
    """What is wrong with a decoded .jsonl line that is not ``{"prompt": str, ...}``."""
    if not isinstance(record, dict):
        return f"this one is a JSON {_json_type(record)}"
    if "prompt" not in record:
        return f'this one has no "prompt" key (its keys: {", ".join(sorted(record)[:10]) or "none"})'
    return f'this one\'s "prompt" is {_json_type(record["prompt"])}'


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _parquet_records(path: Path) -> list[tuple[str, _ImageSource | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in ("prompt", "image") if c in names])  # skip unrelated columns
    except (pa.ArrowException, OSError) as exc:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} cannot be read as Parquet ({exc})") from None
    if "prompt" not in names:
        raise PromptFileError(
            f"data.prompt_file: {str(path)!r} has no 'prompt' column (columns: {names}); rename the column that holds the prompts"
        )
    column = table.column("prompt")
    if not _is_text(column.type):
        raise PromptFileError(f"data.prompt_file: {str(path)!r}: the 'prompt' column holds {column.type}, not strings")
    prompts = column.to_pylist()
    nulls = [row for row, prompt in enumerate(prompts) if prompt is None]
    if nulls:
        raise PromptFileError(
            f"data.prompt_file: {str(path)!r} rows {nulls[:5]}{' ...' if len(nulls) > 5 else ''}: the prompt is null "
            f"({len(nulls)} of {len(prompts)} rows); drop those rows or fill them in"
        )
    prompts = [prompt.strip() for prompt in prompts]
    if "image" not in names:
        return [(p, None) for p in prompts]
    records = []
    for row, (prompt, image) in enumerate(zip(prompts, table.column("image").to_pylist())):
        where = f"data.prompt_file {str(path)!r} row {row}"
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if image is None:
            records.append((prompt, None))
        elif isinstance(image, bytes):
            records.append((prompt, _ImageSource(where, data=image)))
        elif isinstance(image, str):
            records.append((prompt, _path_source(image, path, where)))
        else:
            raise PromptFileError(f"{where}: the image column must hold paths or encoded image bytes, got {type(image).__name__}")
    return records


def _is_text(arrow_type) -> bool:
    """Strings in any of Arrow's layouts, including dictionary-encoded ones (pandas categoricals)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def _path_source(image: str, prompt_file: Path, where: str) -> _ImageSource:
    image_path = Path(image).expanduser()
    return _ImageSource(where, path=image_path if image_path.is_absolute() else prompt_file.parent / image_path)


class PromptOrder:
    """Visits the prompts in a fresh seeded permutation each epoch (each prompt once per epoch)."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts = num_prompts
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def take(self, n: int) -> list[int]:
        ids = []
        while len(ids) < n:
            if not self.order:
                self.order = self.rng.permutation(self.num_prompts).tolist()
            ids.append(self.order.pop(0))
        return ids

    def state_dict(self) -> dict:
        """The position in the data: the RNG of the epoch permutations and what is left of this epoch."""
        return {"rng": self.rng.bit_generator.state, "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = list(state["order"])
