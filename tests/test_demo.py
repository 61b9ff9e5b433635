"""The demo world and the shipped demo pipeline: deterministic rendering, captions that say what the image shows, a
checker that recognises the world (and rejects what is not there), multimodal captions, and a shipped folder that
loads through the ordinary pipeline."""

import numpy as np
import pytest
import torch

from distill.demo import models, quality, world
from sampling.demo import ASSETS, DEMO_FOLDER, DEMO_LORA, DEMO_PROMPTS, T5_LENGTH
from sampling.pipeline import GenerationConfig

# ---------------------------------------------------------------------------------------------- the world


def test_rendering_is_deterministic_given_the_seed():
    a, caps_a, scenes_a = world.sample(3, 16)
    b, caps_b, scenes_b = world.sample(3, 16)
    c, caps_c, _ = world.sample(4, 16)
    assert a.shape == (16, world.SIZE, world.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b and scenes_a == scenes_b
    assert not np.array_equal(a, c) and caps_a != caps_c


def test_captions_state_exactly_the_mentioned_attributes():
    _, captions, scenes = world.sample(0, 300)
    for caption, scene in zip(captions, scenes):
        said = world.parse_caption(caption)
        assert said == {k: getattr(scene, k) for k in scene.mentioned}, caption
    assert len({len(s.mentioned) for s in scenes}) >= 4, "captions should range from terse to complete"
    assert any(c == "a shape" or c.startswith("a shape ") for c in captions)


def test_checker_reads_rendered_images():
    images, _, scenes = world.sample(1, 200)
    hits = {k: 0 for k in ("shape", "colour", "background", "position")}
    for image, scene in zip(images, scenes):
        read = world.read_image(image)
        assert read["found"]
        for k in hits:
            hits[k] += read[k] == getattr(scene, k)
    # position can be off by one cell when the shape sits a pixel from a cell border: allow 2%
    assert all(n >= 196 for n in hits.values()), hits
    small_large = [s for s in scenes if s.radius <= world.SIZES["small"][1] or s.radius >= world.SIZES["large"][0]]
    assert all(world.read_image(world.render(s))["size"] == s.size for s in small_large)


def test_checker_rejects_wrong_prompts_and_empty_images():
    scene = world.Scene("circle", "red", "white", "top left", 12.0, 12.0, 9.0)
    read = world.read_image(world.render(scene))
    assert world.adheres(read, world.parse_caption("a red circle at the top left on a white background"))
    for wrong in ("a blue circle", "a red square", "a red circle at the bottom right", "a shape on a black background",
                  "a large red circle"):
        assert not world.adheres(read, world.parse_caption(wrong)), wrong
    blank = np.full((world.SIZE, world.SIZE, 3), world.BACKGROUNDS["gray"], dtype=np.uint8)
    assert not world.read_image(blank)["found"]
    assert not world.adheres(world.read_image(blank), world.parse_caption("a shape"))



def test_checker_reads_non_square_images_on_their_own_grid():
    """`evaluate --out --width W --height H` draws the demo's prompts at any shape, and scores them after all the
    rendering: the cells are thirds of the width and of the height, the templates the image's shape."""
    def drawn(shape, colour, cx, cy, radius, height, width):
        a = world.shape_mask(shape, cx, cy, radius, (height, width), world.SUPERSAMPLE)[..., None]
        fg, bg = np.array(world.COLOURS[colour]), np.array(world.BACKGROUNDS["white"])
        return np.round(a * fg + (1 - a) * bg).astype(np.uint8)

    tall = drawn("square", "blue", 32.0, 20.0, 12.0, 128, 64)  # the middle column: it is 64 wide, not 128
    read = world.read_image(tall)
    assert tall.shape == (128, 64, 3) and read["position"] == "top" and read["shape"] == "square", read
    wide = drawn("triangle", "red", 150.0, 50.0, 10.0, 64, 192)
    read = world.read_image(wide)
    assert (read["position"], read["shape"], read["colour"], read["iou"] > 0.9) == ("bottom right", "triangle",
                                                                                   "red", True), read
    assert quality.score(np.stack([wide]), ["a red triangle at the bottom right"])["adherence"] == 100.0

def test_blur_scores_worse_crispness_than_the_render():
    images, _, _ = world.sample(2, 8)
    mixed = ((images[:4].astype(np.float32) + images[4:]) / 2).astype(np.uint8)  # two modes averaged
    assert np.mean([world.crispness(m) for m in mixed]) > 3 * np.mean([world.crispness(i) for i in images])


def test_a_caption_is_multimodal():
    prompt = "a red circle at the top left"
    a, scenes_a = world.sample_for_prompt(prompt, seed=0, n=24)
    b, _ = world.sample_for_prompt(prompt, seed=1, n=24)
    assert not np.array_equal(a, b)
    assert all(world.adheres(world.read_image(im), world.parse_caption(prompt)) for im in a)
    assert len({s.background for s in scenes_a}) == 3  # left open by the caption: every background occurs
    assert np.std([s.radius for s in scenes_a]) > 1.5 and np.std([s.cx for s in scenes_a]) > 1.0
    _, open_shape = world.sample_for_prompt("a red shape", seed=0, n=24)
    assert len({s.shape for s in open_shape}) >= 4


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError):
        world.parse_caption("a photo of a cat")


# ---------------------------------------------------------------------------------------------- the shipped demo

@pytest.fixture(scope="module")
def demo():
    return models.demo_pipeline()


def test_shipped_assets_are_small_and_complete():
    assert models.folder_size(ASSETS) <= 20e6  # the budget: pipeline, LoRA and prompts together
    assert DEMO_LORA.is_file() and DEMO_PROMPTS.is_file()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (DEMO_FOLDER / part).is_dir(), part


def test_shipped_models_have_the_demo_configs(demo):
    flux = demo.transformer
    assert flux.config == models.FLUX_CONFIG and not flux.config.guidance_embed
    vae = demo.vae
    assert vae.config.downscale == 4 and vae.config.z_channels == 16
    sched = demo.schedule(GenerationConfig())
    assert sched.shift == 1.0 and not sched.dynamic


def test_tokenizer_has_t5_ids_and_one_piece_per_word():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(DEMO_FOLDER / "tokenizer_2" / "spiece.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    words = {w for c in world.sample(0, 200)[1] for w in c.split()}
    assert all(len(sp.encode(w)) == 1 for w in words)


def test_text_embeddings_depend_on_the_prompt(demo):
    cond = demo.encode(["a red circle", "a blue circle", "a red square"], T5_LENGTH)
    assert cond["txt"].shape == (3, T5_LENGTH, models.FLUX_CONFIG.context_in_dim)
    for key in ("txt", "y"):
        v = cond[key].flatten(1)
        assert (v[0] - v[1]).abs().max() > 1e-2 and (v[0] - v[2]).abs().max() > 1e-2, key


def test_vae_reconstructs_the_world(demo):
    images, captions, scenes = world.sample(11, 16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = demo.vae.normalize_latents(demo.vae.encode(x))
    assert 0.5 < latents.std() < 2.0, "normalised latents should be about unit scale"
    rec = quality.decode(demo.vae, latents)
    assert quality.paired_distance(rec, images) < 0.03
    full = [world.with_mentions(s, world.ATTRIBUTES).caption for s in scenes]
    assert quality.score(rec, full)["adherence"] >= 90


def test_four_step_sample_draws_an_image(demo):
    cfg = GenerationConfig(height=64, width=64, steps=4, seed=0, max_sequence_length=T5_LENGTH)
    images = demo(["a red circle at the top left"], cfg, output="tensor")
    assert images.shape == (1, 3, 64, 64) and images.std() > 0.05


def sample_scores(demo, steps: tuple[int, ...], seed: int, shift: float | None = None) -> dict[int, dict]:
    """quality.score of `quality.PROMPTS` x 2 noises (from `seed`) at each step count, plus the images: a cheap
    version of `distill.evaluate`'s measurement (`shift`: the SCFM grid with that shift, else the demo's grid)."""
    prompts = [p for p in quality.PROMPTS for _ in range(2)]
    cond = demo.encode(prompts, T5_LENGTH)
    noise = torch.randn(len(prompts), 16, 16, 16, generator=torch.Generator().manual_seed(seed))
    out = {}
    for n in steps:
        images = quality.decode(demo.vae, quality.sample_latents(demo.transformer, cond, noise, n, shift=shift))
        out[n] = {**quality.score(images, prompts), "images": images}
    return out


def test_teacher_follows_prompts_at_32_steps_better_than_at_4(demo):
    scores = sample_scores(demo, (4, 32), seed=0)
    assert scores[32]["adherence"] >= 60
    assert scores[32]["crispness"] < scores[4]["crispness"]


def test_shipped_lora_is_a_few_step_sampler(demo):
    """The shipped SCFM LoRA against its own teacher, 12 prompts x 2 noises, sampled as its metadata asks (4 steps,
    shift 3): one step already follows the prompts (the teacher's single step does not), and four steps land at
    most half as far from the teacher's 32-step images (same noises) as the teacher's own four steps do, on the
    teacher's grid or on the LoRA's. A zero or mismatched LoRA fails."""
    from weights.lora import read_lora
    from weights.lora_merge import apply_loras, unload_loras

    hints = read_lora(DEMO_LORA).recommended  # what `generate --lora demo` follows
    assert (hints.steps, hints.schedule, hints.shift) == (4, "scfm", 3.0)
    reference = sample_scores(demo, (32,), seed=1)[32]["images"]
    teacher = sample_scores(demo, (1, 4), seed=1)
    teacher_shifted = sample_scores(demo, (4,), seed=1, shift=hints.shift)
    apply_loras(demo.transformer, [(read_lora(DEMO_LORA), 1.0)], restorable=True)
    try:
        student = sample_scores(demo, (1, 4), seed=1, shift=hints.shift)
    finally:
        unload_loras(demo.transformer)
    assert student[1]["adherence"] >= teacher[1]["adherence"] + 10  # a zero LoRA gives +0

    def paired(run):
        return quality.paired_distance(run[4]["images"], reference)

    assert paired(student) <= 0.5 * paired(teacher)
    assert paired(student) < paired(teacher_shifted)


def test_the_variant_world_reads_its_own_renders_back():
    """The variant (the own-LoRA demo's style: the palette swapped): its renders read back with every attribute
    right, in its colours, 100% in its style; the base world's renders 0%."""
    from distill.demo import quality

    images, captions, scenes = world.sample(5, 120, world="variant")
    base_images, _, _ = world.sample(5, 120)
    for image, caption_, scene in zip(images, captions, scenes):
        read = world.read_image(image, "variant")
        assert world.adheres(read, world.parse_caption(caption_)) and read["colour"] == scene.colour
    assert quality.score(images, captions, "variant")["style"] == 100.0
    assert quality.score(base_images, captions, "variant")["style"] == 0.0
    assert quality.score(base_images, captions)["style"] == 100.0
