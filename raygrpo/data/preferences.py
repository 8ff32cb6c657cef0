"""Preference pairs for offline training (Diffusion-DPO, DCPO: raygrpo/algorithms/dcpo.py).

One record per pair, in ``data.prompt_file`` (``.jsonl``: one JSON object per line; ``.parquet``: one row per pair),
a Pick-a-Pic-like schema with DCPO's captions:

==============================  ======================================================================================
field                           what
==============================  ======================================================================================
``prompt`` (required)           the prompt both images were generated for (Pick-a-Pic's ``caption``)
``preferred`` (required)        the preferred image x^w: a path (relative to the data file's folder) or, in Parquet,
                                PNG/JPEG bytes or a Hugging Face image struct ``{"bytes", "path"}``
``rejected`` (required)         the rejected image x^l, as ``preferred``
``preferred_caption``           a captioner's caption of x^w (DCPO-c and DCPO-h)
``rejected_caption``            a captioner's caption of x^l (DCPO-c)
``perturbed_prompt``            the prompt, semantically perturbed (DCPO-p: the caption of x^l)
``perturbed_rejected_caption``  ``rejected_caption``, perturbed (DCPO-h: the caption of x^l)
==============================  ======================================================================================

From Pick-a-Pic v2: ``prompt = caption``; ``preferred``/``rejected`` = ``jpg_0``/``jpg_1`` by ``label_0`` (1: jpg_0 is
preferred; ties, 0.5, are dropped, as the Diffusion-DPO release drops them). Pick-Double Caption (DCPO's data set,
huggingface ``DualCPO/pick-double-caption``) adds the captioner captions of both images and three strengths of
perturbation; map them onto the fields above. The captions are data: captioning or perturbing happens before training
(the paper's captioners: LLaVA, Emu2; perturbation: DIPPER), e.g. with ``python -m raygrpo.data.caption`` (a served
VLM / chat model, raygrpo/data/caption.py). :func:`perturb_prompt` is a toy perturbation for tests.

Which captions a pair trains with (:func:`pair_captions`): Diffusion-DPO the prompt for both images; DCPO-c
(preferred_caption, rejected_caption); DCPO-p (prompt, perturbed_prompt); DCPO-h (preferred_caption,
perturbed_rejected_caption). A record that lacks a field its variant needs, an empty prompt, or an image that cannot
be read raises :class:`PreferenceFileError` naming the file, the line (row) and the field. Records keep their order:
record ``i`` is prompt ``i`` of :func:`raygrpo.data.prompts.load_prompts` on the same file (which reads ``prompt`` only).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raygrpo.contracts import Conditioning, Rollout

CAPTION_FIELDS = ("preferred_caption", "rejected_caption", "perturbed_prompt", "perturbed_rejected_caption")

# Which record fields give (caption of x^w, caption of x^l), by algorithm.captions; None: Diffusion-DPO (the prompt twice).
CAPTION_VARIANTS: dict[str | None, tuple[str, str]] = {
    None: ("prompt", "prompt"),
    "captioner": ("preferred_caption", "rejected_caption"),
    "perturbed": ("prompt", "perturbed_prompt"),
    "hybrid": ("preferred_caption", "perturbed_rejected_caption"),
}


class PreferenceFileError(ValueError):
    """A preference file that cannot be used; the message names the file, the record and what to change."""


@dataclass(frozen=True)
class PairImage:
    """Where one image of a pair comes from: a file or encoded bytes, and the record that named it (for errors)."""

    where: str
    path: Path | None = None
    data: bytes | None = None

    def load(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB, resized (bicubic) to ``size = (height, width)`` when given."""
        try:
            with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as image:
                rgb = image.convert("RGB")
                if size is not None and rgb.size != (size[1], size[0]):
                    rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                return np.asarray(rgb, dtype=np.uint8).copy()
        except (OSError, ValueError) as exc:
            what = str(self.path) if self.path is not None else "in-line image bytes"
            raise PreferenceFileError(f"{self.where}: image {what!r} cannot be read ({exc})") from None


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair and its optional DCPO captions."""

    where: str  # the file and line (row) it came from, for errors
    prompt: str
    preferred: PairImage
    rejected: PairImage
    preferred_caption: str | None = None
    rejected_caption: str | None = None
    perturbed_prompt: str | None = None
    perturbed_rejected_caption: str | None = None


def load_preferences(path: str | Path) -> list[PreferenceRecord]:
    """Every pair of a ``.jsonl`` or ``.parquet`` file, in order (module docstring for the schema)."""
    path = Path(path)
    return [parse_record(row, where, path) for where, row in preference_rows(path)]


def preference_rows(path: str | Path, every_column: bool = False) -> list[tuple[str, dict]]:
    """``(where, row)`` of every record of a pairs file, in order, as read: the schema's fields, or with
    ``every_column`` whatever else the rows hold too (raygrpo/data/caption.py writes them back)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceFileError(f"data.prompt_file: preference file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, every_column)
    else:
        raise PreferenceFileError(f"data.prompt_file: {str(path)!r}: preference pairs come as .jsonl or .parquet (schema in raygrpo/data/preferences.py)")
    if not rows:
        raise PreferenceFileError(f"data.prompt_file: {str(path)!r} holds no preference pairs")
    return rows


def pair_captions(record: PreferenceRecord, captions: str | None) -> tuple[str, str]:
    """``(z_w, z_l)``: the captions the preferred and the rejected image train with (module docstring)."""
    fields = CAPTION_VARIANTS[captions]
    texts = [getattr(record, name) for name in fields]
    missing = [name for name, text in zip(fields, texts) if not text]
    if missing:
        raise PreferenceFileError(
            f"{record.where}: algorithm.captions={captions!r} needs {' and '.join(missing)}, which this pair lacks; "
            "add it to every pair, or choose another algorithm.captions (Diffusion-DPO needs only the prompt)"
        )
    return texts[0], texts[1]


def check_captions(records: list[PreferenceRecord], captions: str | None) -> None:
    """Every record has the captions its variant needs (raises for the first that does not)."""
    for record in records:
        pair_captions(record, captions)


def perturb_prompt(prompt: str, rng: np.random.Generator, drop: float = 0.3) -> str:
    """A toy semantic perturbation (tests, the tiny set): drop about ``drop`` of the words, then swap two of the rest.
    DCPO perturbs with a paraphrase model (DIPPER); this only makes the caption differ from the prompt."""
    words = prompt.split()
    kept = [w for w in words if rng.random() >= drop] or words[:1]
    if len(kept) > 2:
        i, j = rng.choice(len(kept), size=2, replace=False)
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)


def write_synthetic_preferences(folder: str | Path, prompts: list[str], size: int = 64, seed: int = 0) -> Path:
    """A toy preference set in ``folder``: per prompt, a smooth image (preferred: few kB of JPEG) and a grainy one
    (rejected), PNG files and a ``pairs.jsonl`` with every caption field filled. Returns the .jsonl's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, prompt in enumerate(prompts):
        smooth = _smooth_image(rng, size)  # [size, size, 3] uint8
        grainy = np.clip(_smooth_image(rng, size).astype(np.int16) + rng.integers(-90, 91, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(smooth).save(folder / f"{i:04d}_preferred.png")
        Image.fromarray(grainy).save(folder / f"{i:04d}_rejected.png")
        rejected_caption = f"{prompt}, grainy and noisy"
        record = {
            "prompt": prompt,
            "preferred": f"{i:04d}_preferred.png",
            "rejected": f"{i:04d}_rejected.png",
            "preferred_caption": f"{prompt}, smooth and clean",
            "rejected_caption": rejected_caption,
            "perturbed_prompt": perturb_prompt(prompt, rng),
            "perturbed_rejected_caption": perturb_prompt(rejected_caption, rng),
        }
        lines.append(json.dumps(record))
    out = folder / "pairs.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two colours blended along a random direction: a flat, highly compressible image."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.clip(0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)), 0, 1)[..., None]  # [size, size, 1]
    return (a * (1 - t) + b * t).astype(np.uint8)


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PreferenceFileError(f"data.prompt_file: {str(path)!r} cannot be read as UTF-8 text ({exc})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"data.prompt_file {str(path)!r} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreferenceFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise PreferenceFileError(f'{where}: each line must be an object {{"prompt": ..., "preferred": ..., "rejected": ...}}')
        rows.append((where, row))
    return rows


def _parquet_rows(path: Path, every_column: bool = False) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        wanted = names if every_column else [c for c in ("prompt", "preferred", "rejected", *CAPTION_FIELDS) if c in names]
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise PreferenceFileError(f"data.prompt_file: {str(path)!r} cannot be read as Parquet ({exc})") from None
    return [(f"data.prompt_file {str(path)!r} row {i}", row) for i, row in enumerate(table.to_pylist())]


def parse_record(row: dict, where: str, path: Path) -> PreferenceRecord:
    """One row of :func:`preference_rows` as a record (image paths relative to ``path``'s folder); raises
    :class:`PreferenceFileError` naming ``where`` and the field."""
    missing = [key for key in ("prompt", "preferred", "rejected") if row.get(key) in (None, "")]
    if missing:
        raise PreferenceFileError(f"{where}: {', '.join(missing)} missing (each pair needs prompt, preferred and rejected)")
    texts = {key: row.get(key) for key in ("prompt", *CAPTION_FIELDS)}
    bad = [key for key, value in texts.items() if value is not None and not isinstance(value, str)]
    if bad:
        raise PreferenceFileError(f"{where}: {', '.join(bad)} must be text")
    if not texts["prompt"].strip():
        raise PreferenceFileError(f"{where}: the prompt is empty (records stay aligned with the prompts: give it text or drop the pair)")
    images = {key: _image(row[key], where, key, path) for key in ("preferred", "rejected")}
    return PreferenceRecord(where, **{k: (v.strip() if isinstance(v, str) else v) for k, v in texts.items()}, **images)


def _image(value: object, where: str, key: str, data_file: Path) -> PairImage:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return PairImage(f"{where} ({key})", data=value)
    if isinstance(value, str):
        image = Path(value).expanduser()
        return PairImage(f"{where} ({key})", path=image if image.is_absolute() else data_file.parent / image)
    raise PreferenceFileError(f"{where}: {key} must be an image path or encoded image bytes, got {type(value).__name__}")


# ------------------------------------------------------------------ what a pair is once encoded (rollout -> learner)
@dataclass
class EncodedPair:
    """One pair as the learner trains on it: clean latents in the family's flow coordinates and both captions encoded."""

    latents: np.ndarray  # [2, *latent_shape] float32: x0^w, x0^l
    preferred: Conditioning  # encoding of z_w
    rejected: Conditioning  # encoding of z_l

    @property
    def nbytes(self) -> int:
        return self.latents.nbytes + self.preferred.nbytes + self.rejected.nbytes


@dataclass
class PreferenceRollout(Rollout):
    """A Rollout whose group also carries its preference pair. ``final_latents`` are the evaluation samples the rewards
    score (metrics only); the loss trains on ``pair``."""

    pair: EncodedPair | None = None

    @property
    def nbytes(self) -> int:
        return super().nbytes + (self.pair.nbytes if self.pair is not None else 0)
