"""Where models come from (:mod:`raygrpo.models.hub`): hub ids and folders, the preflight's ``check_pretrained``
(a broken model folder is named before any actor starts), and the tiny random builds the tests and demos use."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer, T5TokenizerFast

from raygrpo.models import ModelFolderError, ModelNotFoundError, check_pretrained, load_model, quantize_timestep, resolve_pretrained, tiny_model_folder
from raygrpo.models.hub import TINY_BUILDERS
from raygrpo.models.tiny import build_clip_tokenizer, build_t5_tokenizer, build_tiny_flux


# ------------------------------------------------------------------------------ where models come from
@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    """Offline, with an empty Hugging Face cache: a real model cached on this machine cannot change the outcome."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_quantize_timestep_follows_dancegrpo():
    sigmas = torch.linspace(1, 0, 17)
    expected = torch.tensor([int(s * 1000) / 1000 for s in sigmas])
    assert torch.equal(quantize_timestep(sigmas), expected)
    assert quantize_timestep(torch.tensor([0.7])).item() == pytest.approx(0.7)  # float32, not 0.699


def test_load_model_checks_the_family_and_its_frames():
    with pytest.raises(ValueError, match="unknown model family 'nope'.*'flux'"):
        load_model("nope", "tiny-random")
    with pytest.raises(ValueError, match="video families"):
        load_model("flux", "tiny-random", num_frames=5)
    assert load_model("flux", "tiny-random", load_vae=False, num_frames=None).vae is None  # None: no frames asked


def test_resolve_pretrained_folders(tmp_path, empty_hf_cache):
    folder = tiny_model_folder("flux")
    assert resolve_pretrained(folder) == str(folder.resolve())
    assert resolve_pretrained("tiny-random") == str(folder)
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_pretrained(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_model("flux", str(tmp_path / "empty"))


def test_resolve_pretrained_hub_id_offline_fails_fast_with_a_fix(empty_hf_cache):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_pretrained("black-forest-labs/FLUX.1-dev")
    assert time.monotonic() - start < 5
    for needle in ("black-forest-labs/FLUX.1-dev", "HF_HUB_OFFLINE", "hf download black-forest-labs/FLUX.1-dev",
                   "huggingface-cli download", "hf auth login", "model.pretrained=DIR"):  # fmt: skip
        assert needle in str(info.value)


def test_resolve_pretrained_unreachable_hub_fails_fast(monkeypatch, empty_hf_cache):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Port 9 (discard) on localhost: refused at once, without touching the real network.
    template = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="could not be reached"):
        resolve_pretrained("black-forest-labs/FLUX.1-dev", timeout=2)
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------- check_pretrained (preflight)
@pytest.mark.parametrize("build", sorted(TINY_BUILDERS))
def test_check_pretrained_passes_a_complete_folder(build):
    family = {"skyreels_v2_i2v": "wan_i2v", "flux2_dev": "flux2", "wan22_i2v": "wan_i2v", "wan22_ti2v": "wan_t2v"}.get(build, build)  # second builds of a family
    check_pretrained(family, str(tiny_model_folder(build)))
    check_pretrained(family, "tiny-random")  # built by the actors, nothing to check on the driver


@pytest.fixture
def flux_copy(tmp_path) -> Path:
    copy = tmp_path / "flux"
    shutil.copytree(tiny_model_folder("flux"), copy)
    return copy


def test_check_pretrained_names_a_truncated_model_index(flux_copy):
    index = flux_copy / "model_index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(ModelFolderError, match=rf"(?s){re.escape(str(index))} is not valid JSON \(.* line \d+ column \d+\).*hf download"):
        check_pretrained("flux", str(flux_copy))


def test_check_pretrained_names_a_corrupt_component_config(flux_copy):
    config = flux_copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace(",", "", 1))
    with pytest.raises(ModelNotFoundError, match=rf"{re.escape(str(config))} is not valid JSON \(Expecting ',' delimiter: line 3 column"):
        check_pretrained("flux", str(flux_copy))
    config.write_bytes(b"\x89PNG\r\n\x1a\n\xff")  # not even text
    with pytest.raises(ModelFolderError, match=rf"{re.escape(str(config))} is not text"):
        check_pretrained("flux", str(flux_copy))


def test_check_pretrained_names_a_weights_file_cut_short(flux_copy):
    """A download that stopped half way: the header promises more bytes than the file has (found from the header alone)."""
    weights = flux_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match=rf"{re.escape(str(weights))} is damaged or cut short: its tensors need {len(data)} bytes"):
        check_pretrained("flux", str(flux_copy))
    weights.write_bytes(b"\xff" * 8)  # not a safetensors header at all
    with pytest.raises(ModelFolderError, match="is damaged or cut short: its header claims"):
        check_pretrained("flux", str(flux_copy))


def test_check_pretrained_names_a_corrupt_tokenizer_file(flux_copy):
    tokenizer = flux_copy / "tokenizer_2" / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text() + "}")
    with pytest.raises(ModelFolderError, match=re.escape(str(tokenizer))):
        check_pretrained("flux", str(flux_copy))


def test_check_pretrained_names_a_missing_component_or_its_config(flux_copy):
    shutil.rmtree(flux_copy / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="has no text_encoder_2/ folder, so the download is incomplete"):
        check_pretrained("flux", str(flux_copy))
    check_pretrained("sd3", str(tiny_model_folder("sd3")))
    with pytest.raises(ModelFolderError, match="no unet/ folder"):  # another family's folder
        check_pretrained("sd", str(tiny_model_folder("sd3")))
    shutil.copytree(tiny_model_folder("flux") / "text_encoder_2", flux_copy / "text_encoder_2")
    (flux_copy / "vae" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"vae holds none of \['config.json'\]"):
        check_pretrained("flux", str(flux_copy))


def test_check_pretrained_of_a_hub_id_or_a_missing_folder_is_resolve_pretrained(tmp_path, empty_hf_cache):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        check_pretrained("flux", "black-forest-labs/FLUX.1-dev")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        check_pretrained("flux", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown model family"):
        check_pretrained("nope", "tiny-random")


# ------------------------------------------------------------------------------------------- tiny builds
@pytest.mark.parametrize("build", sorted(TINY_BUILDERS))
def test_tiny_builds_are_cached_per_version_and_seed(build):
    folder = tiny_model_folder(build)
    assert folder.name == f"tiny-{build}-v1-seed0" and (folder / "model_index.json").is_file()
    assert json.loads((folder / "raygrpo_tiny.json").read_text())["family"] == build
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert tiny_model_folder(build) == folder  # reused, not rebuilt
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_an_unknown_tiny_build_names_the_known_ones():
    with pytest.raises(ValueError, match="'flux'.*'sd3'"):
        tiny_model_folder("no-such-family")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}.{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("build", sorted(TINY_BUILDERS))
def test_tiny_builds_are_deterministic_per_seed(tmp_path, build):
    again, other = _weights(TINY_BUILDERS[build](tmp_path / "again", seed=0)), _weights(TINY_BUILDERS[build](tmp_path / "other", seed=1))
    reference = _weights(tiny_model_folder(build))
    assert again.keys() == reference.keys() == other.keys()
    network = "unet" if build == "sd" else "transformer"
    assert {network, "vae", "text_encoder"} <= {k.split(".")[0] for k in reference}
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    last = f"{network}.conv_out.weight" if build == "sd" else f"{network}.proj_out.weight"
    assert not torch.equal(other[last], reference[last])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temp folders left behind


def test_concurrent_builders_publish_one_complete_folder(tmp_path):
    target = tmp_path / "shared"
    results, errors = [], []

    def build():
        try:
            results.append(build_tiny_flux(target, seed=5))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [target] * 3
    assert (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp folders left behind


@pytest.mark.parametrize("subfolder, loader", [("tokenizer", CLIPTokenizer), ("tokenizer_2", T5TokenizerFast)])
def test_tiny_tokenizers_tokenise_english_and_reload_identically(subfolder, loader):
    text = "A photo of an astronaut riding a horse on the moon, highly detailed"
    built = build_clip_tokenizer() if subfolder == "tokenizer" else build_t5_tokenizer()
    loaded = loader.from_pretrained(tiny_model_folder("flux"), subfolder=subfolder)
    ids = built(text).input_ids
    assert loaded(text).input_ids == ids
    # CLIP's unknown token is <|endoftext|>, so look at the prompt's pieces without the specials.
    pieces = built(text, add_special_tokens=False).input_ids
    assert len(pieces) >= 10 and built.unk_token_id not in pieces
    # Listed words stay whole, so different prompts give clearly different ids.
    assert built("a dog in the snow").input_ids != built("a cat on the beach").input_ids
