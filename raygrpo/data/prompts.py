"""Prompt sources (with their conditioning images, for image-to-video) and the order prompts are visited in.

Sources, chosen by ``data.prompts`` / the suffix of ``data.prompt_file``:

- inline ``data.prompts`` or a ``.txt`` file (one prompt per line): text only;
- ``.jsonl``: one JSON object per line, ``{"prompt": str, "image": path}``; ``image`` is optional
  (text-only files leave it out) and a relative path is relative to the .jsonl's folder;
- ``.parquet``: a ``prompt`` column and, optionally, an ``image`` column holding a path (as above)
  or the encoded bytes of a PNG/JPEG (a struct with a ``bytes`` field, as Hugging Face datasets
  store images, works too).

:func:`load_prompts` returns the prompts; :func:`load_prompt_images` the conditioning images
aligned with them (None for text-only sources), decoded on access so a large data set does not
sit decoded in the driver's memory. Every image is opened and decoded once up front by
:meth:`PromptImages.check`, so a missing or unreadable one stops the run before Ray starts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from raygrpo.config import DataConfig


class PromptFileError(ValueError):
    pass


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
        return list(data.prompts)
    return [prompt for prompt, _ in _read_records(data.prompt_file)]


def load_prompt_images(data: DataConfig) -> PromptImages | None:
    """The conditioning images aligned with :func:`load_prompts` (``images[i]`` for prompt i), or None for a text-only source.

    A source where some records have an image and others do not is an error: image-to-video
    needs one per prompt. Images are not decoded here; call :meth:`PromptImages.check` for that.
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
            f"{len(missing)} of them (records {missing[:5]}{' ...' if len(missing) > 5 else ''}); image-to-video needs one per prompt"
        )
    return PromptImages([source for _, source in records])


def _read_records(prompt_file: str) -> list[tuple[str, _ImageSource | None]]:
    """``(prompt, image source or None)`` per non-empty prompt of the file."""
    path = Path(prompt_file)
    if not path.is_file():
        raise PromptFileError(f"data.prompt_file: {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        records = _parquet_records(path)
    elif path.suffix == ".jsonl":
        records = _jsonl_records(path)
    else:
        records = [(line.strip(), None) for line in path.read_text().splitlines()]
    records = [(prompt, image) for prompt, image in records if prompt]
    if not records:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} holds no prompts")
    return records


def _jsonl_records(path: Path) -> list[tuple[str, _ImageSource | None]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data.prompt_file {str(path)!r} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PromptFileError(
                f'{where}: each line must be an object with a "prompt" string, e.g. {{"prompt": "...", "image": "cat.png"}}'
            )
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise PromptFileError(f'{where}: "image" must be a path (a string), got {type(image).__name__}')
        records.append((record["prompt"].strip(), _path_source(image, path, where) if image else None))
    return records


def _parquet_records(path: Path) -> list[tuple[str, _ImageSource | None]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} has no 'prompt' column (columns: {table.column_names})")
    prompts = [str(p).strip() if p else "" for p in table.column("prompt").to_pylist()]
    if "image" not in table.column_names:
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
