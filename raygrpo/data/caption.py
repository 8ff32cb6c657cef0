"""Fill DCPO's caption fields of a preference-pairs file with a served chat model.

    python -m raygrpo.data.caption PAIRS --out NEW_PAIRS --url http://127.0.0.1:8000
    python -m raygrpo.data.caption PAIRS --out NEW_PAIRS --serve-model /models/llava --fields preferred_caption

DCPO (arXiv 2502.06023, §3 and Figure 2; raygrpo/algorithms/dcpo.py) trains each image of a pair with a caption of
its own. Its variants need (raygrpo/data/preferences.py): DCPO-c ``preferred_caption`` and ``rejected_caption``, DCPO-p
``perturbed_prompt``, DCPO-h ``preferred_caption`` and ``perturbed_rejected_caption``. This fills them:

* ``preferred_caption`` / ``rejected_caption``: a vision-language model describes the image (the paper's captioners:
  LLaVA 1.6 34B and Emu2; Pick-Double Caption, ``DualCPO/pick-double-caption``, is built this way). The question
  shows the model the pair's prompt, as the paper's captioning is "given the shared prompt c" (Figure 2).
* ``perturbed_prompt`` / ``perturbed_rejected_caption``: the prompt (the rejected caption) semantically perturbed.
  The paper perturbs with DIPPER (``kalpeshk2011/dipper-paraphraser-xxl``, a T5-XXL paraphraser with lexical- and
  order-diversity controls in 0..100) at three strengths, weak, medium and strong (all three ship with Pick-Double
  Caption; the exact diversity values were not found to check). We ask an instruction-following chat model instead,
  text only, on the same endpoint: ``--strength`` picks one of three instructions worded after those strengths.
  This is a deviation: a chat model's perturbations are not DIPPER's, and their strength is only as calibrated as
  the model follows the instruction.

The endpoint is the VLM judge's (raygrpo/reward/vlm_judge.py): ``--url`` of a running OpenAI-compatible server, or
``--serve-model`` to launch vLLM from ``.venv-vllm`` (``--serve-python``) and stop it at the end; the same client,
retries (transport errors, timeouts, 429, 5xx) and launch code. Decoding is greedy (temperature 0), so a rerun asks
for the same text.

It writes a new file (``--out``, .jsonl or .parquet, never the input), keeps every field and column of the input
(relative image paths are rewritten relative to the new file's folder), and keeps captions already present unless
``--overwrite``. Every answer is appended to ``NEW_PAIRS.progress.jsonl`` as it arrives, so a run that is
interrupted or fails resumes where it stopped when started again with the same arguments (nothing computed is asked
for twice). Records that could not be captioned are reported one per line with their error, the new file is not
written, and the exit code is 1; the progress file is removed once the new file is complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygrpo.data.preferences import CAPTION_FIELDS, PreferenceFileError, PreferenceRecord, parse_record, preference_rows
from raygrpo.reward.media import encode_png
from raygrpo.reward.transport import RequestFailed, run_sync
from raygrpo.reward.vlm_judge import VlmJudgeReward

logger = logging.getLogger(__name__)

# What each field is made from: an image to describe, or a text to perturb.
SOURCES = {
    "preferred_caption": ("image", "preferred"),
    "rejected_caption": ("image", "rejected"),
    "perturbed_prompt": ("text", "prompt"),
    "perturbed_rejected_caption": ("text", "rejected_caption"),
}

CAPTION_QUESTION = (
    'This image was generated for the prompt "{prompt}". Describe what the image actually shows in one sentence '
    "of at most 30 words, as a text-to-image prompt. Answer with the sentence only."
)

# After DIPPER's strengths: weak keeps the meaning and changes wording, medium changes a detail, strong the content.
PERTURBATIONS = {
    "weak": "Paraphrase this image description: keep its meaning, change the wording and word order.",
    "medium": "Rewrite this image description so that it changes one or two details (an object, an attribute, a count "
    "or the style) and keeps the rest.",
    "strong": "Rewrite this image description so that it describes a clearly different image: change the main subject "
    "or most of its attributes, keep the length and the style of writing.",
}
PERTURB_SUFFIX = ' Answer with the new description only.\n\nDescription: "{text}"'


class CaptionError(RuntimeError):
    """Some records could not be captioned; the message lists them."""


@dataclass(frozen=True)
class CaptionOptions:
    """What to fill and how: the fields, whether present ones are replaced, the perturbation strength, answer length."""

    fields: tuple[str, ...] = CAPTION_FIELDS
    overwrite: bool = False
    strength: str = "medium"
    max_tokens: int = 77  # CLIP's context: a longer caption is cut by SD's text encoder anyway
    question: str = CAPTION_QUESTION


@dataclass
class CaptionReport:
    """What a run did: answers asked for now, taken from the progress file, kept from the input, and failures."""

    asked: int = 0
    resumed: int = 0
    kept: int = 0
    failures: dict[int, str] = field(default_factory=dict)  # record index -> error


def caption_file(source: str | Path, out: str | Path, endpoint: VlmJudgeReward, options: CaptionOptions) -> CaptionReport:
    """Fill ``options.fields`` of every pair in ``source`` and write ``out`` (module docstring); raises
    :class:`CaptionError` (after saving progress) when some record could not be captioned."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {str(out)!r} is the input file: the captioner writes a new file, never the input")
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise ValueError(f"--out {str(out)!r}: write .jsonl or .parquet")
    unknown = sorted(set(options.fields) - set(SOURCES))
    if unknown or options.strength not in PERTURBATIONS:
        raise ValueError(f"unknown --fields {unknown} (choose from {list(SOURCES)}) or --strength {options.strength!r} (choose from {list(PERTURBATIONS)})")
    rows = preference_rows(source, every_column=True)
    records = [parse_record(row, where, source) for where, row in rows]
    progress = Path(f"{out}.progress.jsonl")
    done = _read_progress(progress, records)
    report = CaptionReport()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(progress, "a", encoding="utf-8") as journal:
        run_sync(_caption_all(records, [row for _, row in rows], done, journal, endpoint, options, report))
    if report.failures:
        lines = "\n".join(f"  {records[i].where}: {error}" for i, error in sorted(report.failures.items()))
        raise CaptionError(
            f"{len(report.failures)} of {len(records)} records could not be captioned; {str(out)!r} was not written. Finished "
            f"answers are kept in {str(progress)!r}: run the same command again to retry only what is missing.\n{lines}"
        )
    _write(out, [_relocated(row, source.parent, out.parent) for _, row in rows])
    progress.unlink()
    return report


async def _caption_all(records, rows, done, journal, endpoint: VlmJudgeReward, options: CaptionOptions, report: CaptionReport) -> None:
    semaphore = asyncio.Semaphore(endpoint.params.concurrency)
    async with endpoint.client() as client:
        try:
            model = await endpoint.served_model(client)
        except RequestFailed as exc:
            report.failures = {i: str(exc) for i in range(len(records))}
            return
        await asyncio.gather(*(_caption_one(i, r, rows[i], done, journal, client, model, endpoint, options, report, semaphore) for i, r in enumerate(records)))


async def _caption_one(i, record: PreferenceRecord, row: dict, done, journal, client, model, endpoint, options, report, semaphore) -> None:
    """Fill record ``i``'s fields in order (a rejected caption before its perturbation); its first failure stops it."""
    for name in options.fields:
        if row.get(name) and not options.overwrite:
            report.kept += 1
            continue
        if (i, name) in done:
            row[name] = done[(i, name)]
            report.resumed += 1
            continue
        kind, what = SOURCES[name]
        if kind == "text" and not row.get(what):
            report.failures[i] = f"{name}: perturbs {what}, which this record lacks (add it, or add {what} to --fields first)"
            return
        try:
            async with semaphore:
                body = await asyncio.to_thread(_request_body, record, row, name, model, options)
                text = answer_text(await endpoint.chat(client, body))
        except (RequestFailed, PreferenceFileError, ValueError) as exc:
            report.failures[i] = f"{name}: {exc}"
            return
        row[name] = text
        report.asked += 1
        journal.write(json.dumps({"record": i, "prompt": record.prompt, "field": name, "text": text}) + "\n")
        journal.flush()  # an interrupted run keeps every answer it got


def _request_body(record: PreferenceRecord, row: dict, name: str, model: str, options: CaptionOptions) -> dict[str, Any]:
    """The chat-completions body that asks for field ``name`` of ``record`` (public shape: OpenAI's chat API)."""
    kind, what = SOURCES[name]
    if kind == "image":
        image = getattr(record, what).load()  # [H, W, 3] uint8
        content: Any = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_png(image)}"}},
            {"type": "text", "text": options.question.replace("{prompt}", record.prompt)},
        ]
    else:
        content = PERTURBATIONS[options.strength] + PERTURB_SUFFIX.replace("{text}", row[what])
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": options.max_tokens, "temperature": 0.0}


def answer_text(answer: Any) -> str:
    """The one-line text of a chat-completions answer (surrounding quotes dropped); ValueError when there is none."""
    try:
        text = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"the answer has no choices[0].message.content: {str(answer)[:300]}") from None
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"the model answered with no text ({str(answer)[:300]})")
    return lines[0].strip("\"'“” ")


def _read_progress(progress: Path, records: list[PreferenceRecord]) -> dict[tuple[int, str], str]:
    """Answers of an earlier run of the same command; an answer for another file's record is refused."""
    done: dict[tuple[int, str], str] = {}
    if not progress.exists():
        return done
    for number, line in enumerate(progress.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
            i, name, text = int(entry["record"]), str(entry["field"]), str(entry["text"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s line %d: not a progress entry (an interrupted write?); asked again", progress, number)
            continue
        if i >= len(records) or records[i].prompt != entry.get("prompt"):
            raise ValueError(f"{str(progress)!r} line {number} belongs to another pairs file (record {i} differs): remove it or choose another --out")
        done[(i, name)] = text
    logger.info("resuming: %d answers from %s", len(done), progress)
    return done


def _relocated(row: dict, source_dir: Path, out_dir: Path) -> dict:
    """``row`` with relative image paths made relative to ``out_dir`` (where the new file is read from)."""
    row = dict(row)
    for key in ("preferred", "rejected"):
        value = row.get(key)
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            row[key] = os.path.relpath((source_dir / value).resolve(), out_dir.resolve())
    return row


def _write(out: Path, rows: list[dict]) -> None:
    """Rows to ``out`` (.jsonl or .parquet) through a temporary file, so a crash leaves no half-written file."""
    partial = out.with_name(out.name + ".partial")
    if out.suffix.lower() == ".jsonl":
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), partial)
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygrpo.data.caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help="the pairs file (.jsonl or .parquet, schema in raygrpo/data/preferences.py)")
    parser.add_argument("--out", required=True, help="the new pairs file to write (.jsonl or .parquet)")
    parser.add_argument("--fields", nargs="+", default=list(CAPTION_FIELDS), choices=list(SOURCES), help="fields to fill (default: all four)")
    parser.add_argument("--overwrite", action="store_true", help="replace fields the input already has")
    parser.add_argument("--strength", default="medium", choices=list(PERTURBATIONS), help="perturbation strength (DIPPER's weak/medium/strong)")
    parser.add_argument("--max-tokens", type=int, default=77, help="longest answer, in tokens")
    server = parser.add_mutually_exclusive_group(required=True)
    server.add_argument("--url", help="base URL of a running OpenAI-compatible server")
    server.add_argument("--serve-model", help="launch vLLM with this model folder (stopped at the end)")
    parser.add_argument("--serve-python", default=".venv-vllm/bin/python", help="interpreter of the vLLM environment")
    parser.add_argument("--model-name", help="served model id (default: the server's first)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="limit on one attempt of one request")
    parser.add_argument("--max-attempts", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve = {"model": args.serve_model, "python": args.serve_python} if args.serve_model else None
    endpoint = VlmJudgeReward(
        url=args.url, serve=serve, model_name=args.model_name, concurrency=args.concurrency, timeout_s=args.timeout_s, max_attempts=args.max_attempts
    )
    options = CaptionOptions(tuple(args.fields), args.overwrite, args.strength, args.max_tokens)
    try:
        endpoint.start()
        report = caption_file(args.pairs, args.out, endpoint, options)
    except (CaptionError, PreferenceFileError, ValueError, RuntimeError) as exc:
        print(f"caption: {exc}", file=sys.stderr)
        return 1
    finally:
        endpoint.close()
    print(f"caption: wrote {args.out}: {report.asked} answers asked for, {report.resumed} resumed, {report.kept} kept from the input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
