"""Tiny, randomly initialised but real-architecture pipelines for tests and smoke runs.

The pipelines are built from the same diffusers/transformers classes as the real checkpoints and
saved with ``save_pretrained``, so everything downstream goes through the ordinary
``from_pretrained`` path. Nothing is downloaded: the tokenizers are made here from a built-in
English word list, so prompts tokenise into meaningful pieces rather than all ``<unk>``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import uuid
from collections import Counter
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

_BUILD_LOCK = threading.Lock()
# One version per build: bump a build's when its builder changes, so that stale cached folders are not reused;
# changing one family's builder never invalidates another family's cache.
TINY_IMAGE_VERSIONS = {"flux": "v1", "sd3": "v1", "sd": "v1"}

# Common English and image-prompt words: the corpus the tiny tokenizers learn their pieces from.
TINY_WORDS = """
a an the of and or with without in on at to from by for into over under above below near behind
beside between through across around inside outside up down left right top bottom front back
is are was be being has have had it its this that these those there here some many few all every
one two three four five six seven eight nine ten first second last other another same different
photo photograph picture image painting drawing sketch illustration render portrait landscape
close closeup view shot scene style art artwork poster cartoon anime digital oil watercolor
cat cats dog dogs bird birds horse horses cow fish lion tiger bear wolf fox rabbit mouse elephant
monkey panda owl duck chicken sheep deer frog snake butterfly animal animals pet
man woman men women boy girl child children baby person people family friend astronaut robot
king queen knight wizard chef doctor teacher student farmer soldier pirate princess
house home building city town street road bridge tower castle church school shop market park
garden forest tree trees flower flowers grass leaf leaves mountain mountains hill river lake sea
ocean beach island desert field farm sky cloud clouds sun moon star stars rain snow storm wind
fire water ice stone rock sand light shadow night day morning evening sunset sunrise winter
summer spring autumn fall weather
car cars bus train plane boat ship bike bicycle truck rocket
table chair bed door window wall floor room kitchen lamp clock book books cup bottle glass plate
bowl box bag hat shirt dress shoes coat umbrella guitar piano ball toy computer phone camera
apple apples banana orange oranges pizza cake bread cheese coffee tea food fruit
red green blue yellow orange purple pink brown black white gray grey gold silver colorful bright
dark big small large tiny huge tall short long old young new beautiful cute happy sad angry
funny scary quiet loud hot cold warm wet dry soft hard smooth rough clean dirty empty full
wooden metal glass plastic shiny golden fluffy furry
sitting standing walking running flying swimming jumping playing eating drinking reading
writing singing dancing sleeping holding wearing looking riding driving cooking smiling
sit stand walk run fly swim jump play eat drink read write sing dance sleep hold wear look ride
detailed realistic photorealistic high quality resolution cinematic lighting sharp focus
background foreground center middle corner side edge
""".split()

_CLIP_MAX_LENGTH = 77  # CLIP's position table; FluxPipeline pads CLIP input to model_max_length
_T5_MAX_LENGTH = 512  # FLUX.1-dev's tokenizer_2 limit


@functools.lru_cache(maxsize=4)
def _learn_bpe_merges(words: tuple[str, ...], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (CLIP style: the last symbol of a word carries ``</w>``).

    Runs until every listed word is a single token or ``num_merges`` is reached, so listed words
    come out whole and other words split into the shared pieces learned first.
    """
    # Earlier words weigh slightly more so ties break the same way on every run.
    corpus = {}
    for rank, word in enumerate(dict.fromkeys(words)):
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        corpus[symbols] = corpus.get(symbols, 0) + 1 + 1.0 / (rank + 2)
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged = {}
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + freq
        corpus = merged
    return merges


def build_clip_tokenizer(num_merges: int = 1000):
    """A byte-level BPE ``CLIPTokenizer``: every byte is in the vocabulary, so nothing is unknown."""
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_bpe_merges(tuple(TINY_WORDS), num_merges)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A Unigram ``T5Tokenizer`` (the pipeline's ``T5TokenizerFast`` is the same class in transformers 5).

    Whole words score best, learned BPE pieces next, single characters last, so known words stay
    whole and unknown English words split into pieces; only non-ASCII symbols map to ``<unk>``.
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for rank, word in enumerate(dict.fromkeys(TINY_WORDS)):
        pieces.setdefault("▁" + word, -4.0 - 0.001 * rank)
    for left, right in _learn_bpe_merges(tuple(TINY_WORDS), 1000):
        piece = (left + right).replace("</w>", "")
        pieces.setdefault("▁" + piece, -6.0)
        pieces.setdefault(piece, -6.5)
    for code in range(33, 127):
        pieces.setdefault("▁" + chr(code), -9.0)
        pieces.setdefault(chr(code), -10.0)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=_T5_MAX_LENGTH)


# ------------------------------------------------------------------------------ shared components
def tiny_clip_config(tokenizer, width: int, **extra):
    """A 2-layer ``CLIPTextConfig`` of ``width`` over ``tokenizer``'s vocabulary (77 positions, as CLIP)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        # The pooled output is read at the end-of-text position, found through eos_token_id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_t5_config(config_cls: type, tokenizer, width: int):
    """A 2-layer T5 v1.1 encoder config (``T5Config`` or Wan's ``UMT5Config``) of ``width`` over ``tokenizer``."""
    return config_cls(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as the real t5-v1_1-xxl and UMT5-xxl
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_kl_vae(latent_channels: int, scaling_factor: float, **extra):
    """An ``AutoencoderKL`` with 4 blocks of 8 channels: three downsamplings, the real x8 geometry."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    ).eval()


# ---------------------------------------------------------------------------------- image builds
def _build_flux_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()

    # Each component gets its own seed so that changing one never reshuffles the others.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 VAE latent channels x a 2x2 packing patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(seed + 1)
    # FLUX's factors (FluxPipeline fails with shift_factor None).
    vae = tiny_kl_vae(4, 0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 32, projection_dim=32)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(tiny_t5_config(T5Config, tokenizer_2, 32)).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return pipeline, {}


def _build_sd3_pipeline(seed: int):
    """A tiny StableDiffusion3Pipeline with SD3.5-Medium's layout at toy widths.

    Widths follow how ``StableDiffusion3Pipeline.encode_prompt`` combines the encoders: the two
    CLIP penultimate hidden states are concatenated (16 + 32 = 48) and zero-padded up to the T5
    width (64), then joined with the T5 states along the sequence, so ``joint_attention_dim`` must be
    the T5 width and at least the CLIP sum (``F.pad`` with a negative amount would silently crop).
    The pooled vector is the two CLIP projections concatenated (16 + 32), hence
    ``pooled_projection_dim = 48``. The CLIP widths differ, as CLIP-L's and CLIP-G's do, so a
    swapped encoder pair fails loudly instead of passing by symmetry.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_widths, t5_width = (16, 32), 64
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    # SD3's CLIP-G tokenizer pads with "!" rather than <|endoftext|>; the pooled output is taken at the
    # first end-of-text token, so this must not move it, and keeping the quirk makes the tiny model honest.
    tokenizer_2.pad_token = "!"
    tokenizer_3 = build_t5_tokenizer()

    # Each component gets its own seed so that changing one never reshuffles the others.
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # latent side of the pipeline's default 64 px image
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=4 * 8,  # the joint blocks run text and image at the same width (heads x head dim)
        pooled_projection_dim=sum(clip_widths),
        out_channels=16,
        pos_embed_max_size=16,  # up to 16 x 16 patches: 256 px images
        dual_attention_layers=(0,),  # SD3.5 Medium's MMDiT-X block in the first layer
        qk_norm="rms_norm",  # as SD3.5
    ).eval()
    torch.manual_seed(seed + 1)
    vae = tiny_kl_vae(16, 1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)  # SD3's factors
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, clip_widths[0], projection_dim=clip_widths[0])).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2, clip_widths[1], projection_dim=clip_widths[1])).eval()
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(tiny_t5_config(T5Config, tokenizer_3, t5_width)).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return pipeline, {}


def _build_sd_pipeline(seed: int):
    """A tiny StableDiffusionPipeline with SD 1.x's layout at toy widths.

    UNet2DConditionModel with a cross-attention down/up block pair and a plain pair (one
    downsampling), 4 latent channels, cross-attention width = the CLIP text width (32); VAE with 4
    blocks (the real x8 geometry) and SD's scaling factor 0.18215; a DDIMScheduler with SD 1.x's
    scaled-linear betas, ``set_alpha_to_one=False``, ``steps_offset=1``, leading spacing, epsilon
    prediction and no sample clipping (what StableDiffusionPipeline forces for SD configs).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_width = 32
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,  # latent side of the default 64 px image
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_width,
        attention_head_dim=4,  # SD 1.x's legacy meaning: the number of heads
    ).eval()
    torch.manual_seed(seed + 1)
    vae = tiny_kl_vae(4, 0.18215)  # SD 1.x's factor, with the quant convs SD's VAE has
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, text_width)).eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline, {}


# ---------------------------------------------------------------------------------------- saving
def _is_built(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _publish(folder: Path, write) -> Path:
    """Run ``write(tmp)`` in a sibling temp folder, then rename it to ``folder`` in one step.

    Readers never see a half-written folder; when several processes race, the first rename wins
    and the others throw their copy away.
    """
    folder = Path(folder).expanduser()
    if _is_built(folder):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists but holds no model_index.json; remove it and build again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)  # atomic; fails when another builder already published
        except OSError:
            if not _is_built(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_tiny_build(folder: str | Path, seed: int, build: str, version: str, make) -> Path:
    """Build ``make(seed) -> (pipeline, stamp extras)`` and save it into ``folder`` (kept as is if already built).

    The folder holds the pipeline's ``save_pretrained`` output and ``raygrpo_tiny.json`` (build name,
    seed, version and the extras).
    """

    def write(tmp: Path) -> None:
        # Module init draws from torch's global RNG: fork it so the caller's stream is left alone, and
        # hold a lock so that threads building at the same time do not interleave their draws.
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            pipeline, extra = make(seed)
        pipeline.save_pretrained(tmp, safe_serialization=True)
        (tmp / "raygrpo_tiny.json").write_text(json.dumps({"family": build, "seed": seed, "version": version, **extra}))

    return _publish(Path(folder), write)


def build_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random FLUX.1-dev-like pipeline into ``folder`` (kept as is if already built).

    Sizes: transformer 1 double + 1 single block, 2 heads x 16 dims, text width 32, RoPE axes
    (4, 6, 6), guidance embedding; VAE with 4 blocks of 8 channels (x8 downsampling) and 4 latent
    channels; CLIP and T5 encoders of width 32 with 2 layers. Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "flux", TINY_IMAGE_VERSIONS["flux"], _build_flux_pipeline)


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random SD3.5-Medium-like pipeline into ``folder`` (kept as is if already built).

    Sizes: transformer of 2 joint blocks (the first with SD3.5's dual attention), 4 heads x 8 dims,
    RMS q/k norm, patch 2, 16 latent channels, text width 64, pooled width 48, position table of
    16 x 16 patches (images up to 256 px); VAE with 4 blocks of 8 channels (x8 downsampling), 16
    latent channels and SD3's scaling/shift factors; CLIP encoders of widths 16 and 32 and a T5
    encoder of width 64, 2 layers each; scheduler shift 3. Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "sd3", TINY_IMAGE_VERSIONS["sd3"], _build_sd3_pipeline)


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Stable Diffusion 1.x-like pipeline into ``folder`` (kept as is if already built).

    Sizes: UNet of 2 blocks (16, 32 channels; one cross-attention block each way, 4 heads), 4 latent
    channels, 8 x 8 latents for 64 px images; VAE with 4 blocks of 8 channels (x8 downsampling);
    CLIP text encoder of width 32 with 2 layers; SD 1.x's DDIM schedule. Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "sd", TINY_IMAGE_VERSIONS["sd"], _build_sd_pipeline)


# The image builds; raygrpo.models.hub.tiny_model_folder caches them with the video builds of tiny_video.py.
TINY_IMAGE_BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3, "sd": build_tiny_sd}

__all__ = [
    "TINY_IMAGE_BUILDERS",
    "TINY_IMAGE_VERSIONS",
    "TINY_WORDS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_flux",
    "build_tiny_sd",
    "build_tiny_sd3",
    "save_tiny_build",
    "tiny_clip_config",
    "tiny_kl_vae",
    "tiny_t5_config",
]
