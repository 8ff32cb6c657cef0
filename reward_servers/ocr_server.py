"""OCR reward server (protocol ``raygrpo.reward/v1``): how well an image shows the text its prompt quotes.

Flow-GRPO's text-rendering reward (Liu et al. 2025, arXiv:2505.05470; the released
``flow_grpo/ocr.py``, which DGPO's released code reuses), served over HTTP. For one image::

    target     = the text between the first pair of double quotes in the prompt
                 ('a neon sign that says "Open 24 Hours"'  ->  'Open 24 Hours')
    recognised = every text line the OCR engine keeps (confidence >= 0.5), joined in reading order
    t, r       = target and recognised, spaces removed, lower-cased
    d          = 0 if t occurs in r, else levenshtein(r, t)   (unit-cost insert, delete, substitute)
    score      = 1 - min(d, len(t)) / len(t)                  in [0, 1]

That is: the edit distance normalised by the length of the target, clipped so the score never goes
below 0 (unrelated extra text costs at most the whole target), and the target found inside other
text counts as exact. These are the released code's choices; the 0.5 confidence cut is PaddleOCR's
default ``drop_score``. A prompt without a pair of double quotes, or with empty ones, and an image the
engine fails on, are item errors (``score: null``), not zeros: the released code would raise for
the whole batch on the former and score 0 for the latter.

The engine is RapidOCR (package ``rapidocr``) on ONNX Runtime, CPU: PaddleOCR's PP-OCR text
detection and recognition networks converted to ONNX, the family Flow-GRPO's PaddleOCR runs. The
networks ship inside the wheel, so nothing is downloaded at run time. RapidOCR's bundled
recogniser (Chinese and Latin script) is not the English PP-OCRv4 one Flow-GRPO loads, so scores
are close to the paper's, not identical. The text-angle classifier is off, as there (``cls=False``).
Detection runs on the image shrunk to at most 960 px a side, as PaddleOCR's defaults do. One image
at a time, about 0.25 s for a 512x512 image on one CPU core; ``--threads`` sets ONNX Runtime's.

Install (``make install`` does it in raygrpo's venv; any venv with FastAPI, uvicorn, pydantic,
Pillow and numpy will do)::

    pip install 'rapidocr>=3.10,<4' 'onnxruntime>=1.17'     # or: pip install -e '.[ocr]'

Run it, then point a run at it (as ``cluster/sd3_dgpo.yaml`` does)::

    python reward_servers/ocr_server.py --port 8010 [--token-env NAME] [--threads 8]
    rewards: [{name: ocr, kind: http, params: {url: "http://127.0.0.1:8010", timeout_s: 300}}]

The protocol plumbing is ``template_server.py``'s, the request limits ``protocol_guard.py``'s.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import protocol_guard as guard
import template_server

SERVER_NAME = "ocr"
MAX_BATCH = 16
INSTALL_HINT = "install the OCR engine: pip install -e '.[ocr]' (or: pip install 'rapidocr>=3.10,<4' 'onnxruntime>=1.17')"
_QUOTED = re.compile(r'"([^"]*)"')


def target_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes, or None when there is none."""
    match = _QUOTED.search(prompt)
    return match.group(1) if match else None


def levenshtein(a: str, b: str) -> int:
    """Fewest single-character insertions, deletions and substitutions turning ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:i-1] to each prefix of b
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognised: str, target: str) -> float:
    """``1 - min(d, len(t)) / len(t)``, d the edit distance, 0 when ``t`` occurs in the recognised text (module docstring)."""
    t = target.replace(" ", "").lower()
    r = recognised.replace(" ", "").lower()
    if not t:
        raise ValueError("the quoted target text is empty")
    distance = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - distance / len(t)


class OcrReward:
    """The scoring function handed to the template's app: RapidOCR loaded once, then called per image."""

    def __init__(self, threads: int | None = None) -> None:
        from rapidocr import RapidOCR  # ImportError when the engine is not installed: see INSTALL_HINT

        # PaddleOCR 2.x's defaults, which Flow-GRPO ran with: keep text at confidence >= 0.5, and detect
        # on the image shrunk to at most 960 px a side (RapidOCR's own default enlarges it to 736 px on
        # the short side: a 512x512 image then takes three times as long).
        params = {"Global.use_cls": False, "Global.text_score": 0.5, "Det.limit_type": "max", "Det.limit_side_len": 960,
                  "Global.log_level": "warning"}  # fmt: skip
        if threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        self._engine = RapidOCR(params=params)

    def recognise(self, image: Image.Image) -> str:
        """All text found in ``image``, lines joined in the engine's reading order; '' when none."""
        result = self._engine(image)  # a PIL image: RapidOCR converts RGB to the BGR its networks expect
        return "".join(getattr(result, "txts", None) or ())

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float | str]:
        scores: list[float | str] = []
        for image, prompt in zip(images, prompts):
            target = target_text(prompt)
            if not target or not target.replace(" ", ""):
                scores.append(f'prompt has no text in double quotes to look for (e.g. a sign that says "OPEN"): {prompt[:120]!r}')
                continue
            try:
                scores.append(ocr_score(self.recognise(image), target))
            except Exception as exc:  # noqa: BLE001 - one image the engine fails on fails alone
                scores.append(f"OCR failed: {type(exc).__name__}: {exc}")
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    guard.add_server_flags(parser, max_batch=MAX_BATCH)
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per network (default: one per core)")
    args = parser.parse_args()
    token = guard.token_from_flags(parser, args)
    try:
        reward = OcrReward(threads=args.threads)
    except ImportError as exc:
        parser.error(f"{exc}; {INSTALL_HINT}")
    limits = guard.limits_from_flags(parser, args)
    app = template_server.create_app(token=token, max_batch=args.max_batch, limits=limits, name=SERVER_NAME, score_fn=reward)
    guard.run(app, args, token=token)


if __name__ == "__main__":
    main()
