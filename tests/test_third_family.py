"""A family is one place: "flax", a renamed tiny FLUX.1 whose checkpoints carry their own key prefix, is declared
here alone and registered; loading, conversion, generate, a training step and its LoRA files then work for it
with no other file knowing it exists."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_data import make_cache

from distill.lora_targets import FLUX_TARGETS
from distill.train import main as train
from model.flux import Flux
from sampling.demo import DEMO_FOLDER
from sampling.generate import main as generate
from sampling.pipeline import FluxPipeline
from sampling.velocity import FluxVelocity
from weights.families import detect_family, register, unregister
from weights.families.flux import FLUX
from weights.io import CONFIG_METADATA_KEY

PREFIX = "flax."


class Flax(Flux):
    """FLUX.1 under another name."""


class FlaxPipeline(FluxPipeline):
    family = "flax"


def _layout(keys):
    """Its official files carry its own prefix (FLUX.1's BFL names behind it); its diffusers layout is FLUX.1's,
    which the metadata our savers write tells apart."""
    keys = list(keys)
    if keys and all(k.startswith(PREFIX) for k in keys) and f"{PREFIX}img_in.weight" in keys:
        return PREFIX, "official"
    found = FLUX.detect_layout(keys)
    return found if found is not None and found[1] == "diffusers" else None


FLAX = replace(
    FLUX, name="flax", title="Flax", display="Flax", aliases=(), model_class=Flax, diffusers_classes=("Flax",),
    detect_layout=_layout, claims=lambda keys: any(k.startswith(PREFIX) for k in keys),
    key_hints=((PREFIX, "a Flax transformer"),), loader="weights.load_transformer('flax', path)",
    official_prefix=PREFIX,
    parts={"velocity": FluxVelocity, "pipeline": FlaxPipeline, "lora_targets": FLUX_TARGETS},
)


@pytest.fixture
def flax():
    register(FLAX)
    yield FLAX
    unregister(FLAX.name)


def _flax_file(tmp_path):
    """The demo transformer as a Flax checkpoint: every key behind the prefix, our config in the metadata."""
    from safetensors.torch import save_file

    from weights.transformer import load_flux

    demo = load_flux(DEMO_FOLDER)
    meta = {CONFIG_METADATA_KEY: json.dumps({"family": "flax", "config": demo.config.to_dict()})}
    path = tmp_path / "flax.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in demo.state_dict().items()}, path, meta)
    return demo, path


def test_loading_and_converting_a_third_family(flax, tmp_path):
    from weights.convert import convert_checkpoint
    from weights.convert_plan import detect
    from weights.io import WeightsError
    from weights.transformer import load_flux, load_transformer

    demo, path = _flax_file(tmp_path)
    assert detect_family(path) is flax and detect(path).family == "flax"
    model = load_transformer("flax", path)
    assert type(model) is Flax and all((model.state_dict()[k] == v).all() for k, v in demo.state_dict().items())
    hint = r"this is a Flax transformer, not a Flux transformer; .* \(in Python: weights.load_transformer\('flax', " \
           r"path\)\)"
    with pytest.raises(WeightsError, match=hint):
        load_flux(path)
    out = convert_checkpoint(path, tmp_path / "diffusers", "diffusers")  # Flux's key tables, Flax's record
    back = convert_checkpoint(out, tmp_path / "back.safetensors", "official")
    assert detect_family(back) is flax  # the official layout written with the family's own prefix
    assert load_transformer("flax", back).config == demo.config


def test_generate_samples_a_third_family_as_its_twin(flax, tmp_path):
    _, path = _flax_file(tmp_path)
    parts = ["--vae", str(DEMO_FOLDER / "vae"), "--clip", str(DEMO_FOLDER / "text_encoder"),
             "--t5", str(DEMO_FOLDER / "text_encoder_2"), "--t5-tokenizer", str(DEMO_FOLDER / "tokenizer_2"),
             "--clip-tokenizer", str(DEMO_FOLDER / "tokenizer")]
    common = ["--prompt", "a red circle on a white background", "--steps", "2", "--width", "64", "--height", "64",
              "--max-sequence-length", "16", "--seed", "3"]
    assert generate(["--model", str(path), *parts, *common, "--out", str(tmp_path / "flax.png")]) == 0
    assert generate(["--model", str(DEMO_FOLDER), *common, "--out", str(tmp_path / "flux.png")]) == 0
    ours, twin = (Image.open(tmp_path / f"{n}.png") for n in ("flax", "flux"))
    assert np.array_equal(np.asarray(ours), np.asarray(twin))
    assert json.loads(ours.text["scfm"])["family"] == "flax"


def test_a_training_step_and_its_lora_files_for_a_third_family(flax, tmp_path, capsys):
    import torch

    from weights.lora import read_lora
    from weights.lora_merge import apply_loras
    from weights.lora_write import write_lora

    make_cache(tmp_path)
    run = tmp_path / "run"
    assert train(["--model", "tiny-flax", "--targets", "flax", "--cache", str(tmp_path / "cache"), "--output",
                  str(run), "--dtype", "fp32", "--device", "cpu", "--rank", "4", "--batch_size", "2", "--steps",
                  "1", "--checkpoint_every", "0", "--t5_length", "5", "--export_set", "live",
                  "--export_formats", "ours", "kohya"]) == 0, capsys.readouterr().err
    lora = read_lora(run / "scfm-lora-live-scfm-only.safetensors")
    assert lora.family == "flax" and lora.modules
    kohya = read_lora(write_lora(lora, tmp_path / "kohya.safetensors", "kohya"))
    assert kohya.family == "flax" and kohya.modules.keys() == lora.modules.keys()
    model = Flax(FLUX.config_class.preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_loras(model, [(kohya, 1.0)])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(Exception, match="a LoRA for Flax; this model is Flux: pass a LoRA trained on Flux, or use this "
                                          "one with the Flax model it was made for"):
        apply_loras(Flux(FLUX.config_class.preset("tiny")), [(lora, 1.0)])
