"""Dataset folders, aspect buckets, the latent / text-embedding cache and the batch order (distill/data.py).

The helpers here (a tiny image folder, fake encoders, a built cache) are shared by test_trainer.py and
test_ddp.py.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.data import BucketBatches, Cache, build_cache, plan_cache
from distill.dataset import BUCKETS_512, DataError, buckets_for, load_image, nearest_bucket, read_folder
from sampling.pipeline import FluxPipeline

# (width, height) of each test image; the blocky content keeps the PNGs tiny and the pooled latents varied
IMAGES = [((512, 512), "a red circle"), ((512, 512), "a blue square"), ((512, 512), "a red circle"),
          ((640, 384), "a wide valley"), ((640, 384), "a long train"), ((448, 576), "a tall tower")]
KEY = {"vae": "fake-vae", "t5": "fake-t5", "t5_length": 5, "resolution": 512}
POOL = 32  # the fake VAE's downscale: 512 px -> 16 latent px -> 64 packed tokens


def write_images(folder, images=IMAGES, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, ((w, h), prompt) in enumerate(images):
        blocks = torch.randint(0, 256, (h // POOL, w // POOL, 3), generator=g, dtype=torch.uint8)
        pixels = blocks.repeat_interleave(POOL, 0).repeat_interleave(POOL, 1)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "prompt": prompt}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


class FakeText:
    """prompts -> {"txt": (B, 5, 32), "y": (B, 24)}: a fixed function of each prompt (tiny Flux's widths)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts):
        self.calls += len(prompts)
        txt, y = [], []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:7], "little")
            g = torch.Generator().manual_seed(seed)
            txt.append(torch.randn(5, 32, generator=g))
            y.append(torch.randn(24, generator=g))
        return {"txt": torch.stack(txt), "y": torch.stack(y)}


class FakeVAE:
    """images (B, 3, H, W) in [0, 1] -> (B, 4, H/pool, W/pool): pooled, mixed to tiny Flux's 4 channels."""

    MIX = torch.tensor([[1.0, -0.5, 0.2], [0.3, 1.0, -0.7], [-0.4, 0.6, 1.0], [0.8, 0.8, -1.0]])

    def __init__(self, pool: int = POOL):
        self.calls, self.pool = 0, pool

    def __call__(self, images):
        self.calls += images.shape[0]
        pooled = F.avg_pool2d(images * 2 - 1, self.pool)  # (B, 3, h, w)
        return torch.einsum("ck,bkhw->bchw", self.MIX, pooled) * 1.5


def make_cache(tmp_path, images=IMAGES, sample_prompts=("a sample",), pool: int = POOL) -> Cache:
    """`pool` 64 (16 packed tokens per 512-px image) makes the fastest runs; it needs even sides / 64."""
    data = tmp_path / "data"
    if not data.exists():
        write_images(data, images)
    plan = plan_cache(data, KEY, 512, sample_prompts, shard_size=4)
    return build_cache(tmp_path / "cache", plan, FakeText, lambda: FakeVAE(pool), batch_size=2,
                       progress=False)


# ----- folders and buckets ----------------------------------------------------------------------------------


def test_images_smaller_than_their_bucket_are_planned_with_one_line_naming_the_fix(tmp_path):
    """Upscaled images are still cached (nothing is refused), with one line: how many, the largest factor and its
    file, and what to pass instead; images as large as their buckets plan in silence."""
    write_images(tmp_path / "a", [((128, 128), "small"), ((64, 128), "smaller"), *IMAGES[:2]])
    with pytest.warns(UserWarning) as caught:
        plan = plan_cache(tmp_path / "a", KEY, 512)
    assert len(plan["items"]) == 4 and [str(w.message) for w in caught] == [
        f"{tmp_path / 'a'}: 2 of 4 images are smaller than their bucket and are upscaled, up to 6.0x (001.png: "
        "64x128 -> 384x640); pass --resolution 64 or larger images"]
    write_images(tmp_path / "b", IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_cache(tmp_path / "b", KEY, 512)


def test_read_folder_metadata_and_pairs(tmp_path):
    write_images(tmp_path / "a", IMAGES[:2])
    assert read_folder(tmp_path / "a")[1].prompt == "a blue square"
    pairs = tmp_path / "b"
    write_images(pairs, IMAGES[:2])
    (pairs / "metadata.jsonl").unlink()
    (pairs / "000.txt").write_text("first\n")
    (pairs / "001.txt").write_text("second")
    assert [(e.file, e.prompt) for e in read_folder(pairs)] == [("000.png", "first"), ("001.png", "second")]
    with pytest.raises(DataError, match="no such dataset folder"):
        read_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        read_folder(tmp_path / "empty")
    (pairs / "metadata.jsonl").write_text('{"file_name": "nope.png", "prompt": "x"}\n')
    with pytest.raises(DataError, match="missing"):
        read_folder(pairs)


def test_buckets():
    assert set(buckets_for(512)) == set(BUCKETS_512)  # the released 512-px list
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets_for(1024))
    assert nearest_bucket(1000, 1000, BUCKETS_512) == (512, 512)
    assert nearest_bucket(1920, 1080, BUCKETS_512) == (640, 384)
    assert nearest_bucket(600, 800, BUCKETS_512) == (448, 576)


def test_load_image_covers_then_centre_crops(tmp_path):
    from PIL import Image

    pixels = torch.zeros(100, 300, 3, dtype=torch.uint8)
    pixels[:, 100:200] = 255  # a white middle third, which the centre crop keeps
    Image.fromarray(pixels.numpy()).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png", (64, 64))
    assert img.shape == (3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert img[:, :, 8:56].mean() > 0.99  # the crop is inside the white third (resized to 192 wide)


@pytest.mark.parametrize("size, bucket, resized, box", [
    # 303x100 into 64x48: scale max(64/303, 48/100) = 0.48 -> 145.44 x 48, rounded to 145 x 48; 81 columns too
    # many, 40 cut on the left (the odd one goes on the right)
    ((303, 100), (64, 48), (145, 48), (40, 0, 104, 48)),
    # 90x201 into 64x96: scale max(64/90, 96/201) = 0.7111 -> 64 x 142.93, rounded (not floored) to 64 x 143;
    # 47 rows too many, 23 cut at the top
    ((90, 201), (64, 96), (64, 143), (0, 23, 64, 119)),
], ids=["wide", "tall"])
def test_load_image_matches_pil_resize_and_centre_crop_exactly(tmp_path, size, bucket, resized, box):
    """A quadrant per colour (all four distinct, red and blue apart) and a non-square bucket: load_image is PIL's
    LANCZOS resize to the covering size then the centre box (both worked out by hand above), in RGB order, unmirrored,
    as (3, H, W) / 255. A mirror, a BGR order, a transpose or another crop box is a different tensor."""
    from PIL import Image

    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (220, 30, 0)  # top left: red
    pixels[: height // 2, width // 2:] = (0, 200, 40)  # top right: green
    pixels[height // 2:, : width // 2] = (10, 40, 230)  # bottom left: blue
    pixels[height // 2:, width // 2:] = (250, 240, 20)  # bottom right: yellow
    Image.fromarray(pixels).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png", bucket)
    w, h = bucket
    assert img.shape == (3, h, w)
    want = np.asarray(Image.fromarray(pixels).resize(resized, Image.Resampling.LANCZOS).crop(box))
    assert torch.equal(img, torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 255)
    # and, independently of PIL, the corners keep their quadrant's colour
    corners = {(0, 0): (220, 30, 0), (0, -1): (0, 200, 40), (-1, 0): (10, 40, 230), (-1, -1): (250, 240, 20)}
    for (y, x), rgb in corners.items():
        assert (img[:, y, x] * 255).round().tolist() == list(rgb), (y, x)


# ----- the cache --------------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    cache = make_cache(tmp_path)
    data = tmp_path / "data"
    assert len(cache) == 6 and cache.plan["prompts"][0] == "a red circle" and len(cache.plan["prompts"]) == 5
    assert cache.buckets == [tuple(wh) for wh, _ in IMAGES]
    for idx in ([0, 2], [3, 4], [5]):
        x0, cond = cache.load(idx)
        w, h = cache.buckets[idx[0]]
        images = torch.stack([load_image(data / f"{i:03d}.png", (w, h)) for i in idx])
        torch.testing.assert_close(x0, FakeVAE()(images), rtol=0, atol=0)
        expected = FakeText()([IMAGES[i][1] for i in idx])
        assert torch.equal(cond["txt"], expected["txt"]) and torch.equal(cond["y"], expected["y"])
        assert x0.shape == (len(idx), 4, h // POOL, w // POOL)
    prompts, sample = cache.sample_cond()
    assert prompts == ["a sample"] and torch.equal(sample["txt"], FakeText()(["a sample"])["txt"])
    with pytest.raises(ValueError, match="one bucket"):
        cache.load([0, 3])


def test_cache_build_resumes_and_refuses_another_key(tmp_path):
    make_cache(tmp_path)
    folder, data = tmp_path / "cache", tmp_path / "data"
    (folder / "latents-00001.safetensors").unlink()  # as if killed before the second latent shard landed
    with pytest.raises(DataError, match="incomplete cache"):
        Cache(folder)
    plan = plan_cache(data, KEY, 512, ("a sample",), shard_size=4)
    text, vae = FakeText(), FakeVAE()
    cache = build_cache(folder, plan, lambda: text, lambda: vae, batch_size=2, progress=False)
    assert (text.calls, vae.calls) == (0, 2)  # only the missing shard's two images were encoded again
    assert len(cache) == 6
    text = FakeText()
    plan = plan_cache(data, KEY, 512, ("another sample",), shard_size=4)
    cache = build_cache(folder, plan, lambda: text, FakeVAE, batch_size=2, progress=False)
    assert text.calls == 1 and cache.sample_cond()[0] == ["another sample"]  # new sample prompts: only those
    other = plan_cache(data, {**KEY, "t5_length": 256}, 512, ("a sample",), shard_size=4)
    with pytest.raises(DataError, match="different key"):
        build_cache(folder, other, FakeText, FakeVAE, progress=False)


# ----- the batch order --------------------------------------------------------------------------------------


def test_bucket_batches_are_a_function_of_the_step():
    buckets = [(512, 512)] * 5 + [(640, 384)] * 3 + [(448, 576)]
    a, b = BucketBatches(buckets, 2, seed=3), BucketBatches(buckets, 2, seed=3)
    assert a.per_epoch == 3 + 2 + 1
    order = [a.batch(s) for s in range(14)]
    assert [b.batch(s) for s in reversed(range(14))] == order[::-1]  # random access, same answers
    for batch in order:
        assert len(batch) == 2 and len({buckets[i] for i in batch}) == 1
    epoch = {i for batch in order[:6] for i in batch}
    assert epoch == set(range(9))  # every item once per epoch (a lone item is paired with itself)
    assert order[6:12] != order[:6]  # the next epoch is reshuffled
    assert a.position(13) == (2, 1)
    other = BucketBatches(buckets, 2, seed=4)
    assert [other.batch(s) for s in range(6)] != order[:6]  # another seed, another order
    huge = BucketBatches(buckets, 2, seed=2**63)  # seed * 1_000_003 overflowed torch's seed range mid-run
    assert len(huge.batch(13)) == 2


# ----- python -m distill.make_dataset -----------------------------------------------------------------------


class FakePipeline(FluxPipeline):
    """FluxPipeline as make_dataset drives it (its own config, negative rule and sampler), on the tiny Flux with
    fake text encoders and a 32x 'VAE' (fast on CPU)."""

    def __init__(self):
        from model.flux import FLUX_CONFIGS, Flux

        super().__init__(None)
        torch.manual_seed(0)
        self._transformer, self.text, self.rendered = Flux(FLUX_CONFIGS["tiny"]), FakeText(), 0

    def schedule(self, cfg):
        from sampling.schedules import SCHEDULES

        return SCHEDULES["flux-dev"]

    def check_transformer(self):
        pass  # the tiny Flux is built in memory: there are no files to check

    def check_components(self):
        pass  # nor files of a VAE or text encoders

    def check_size(self, height, width, images):
        pass  # nor a VAE whose config would give the size multiple

    def tokenizers(self, max_sequence_length):
        return None  # FakeText needs none

    def encode(self, prompts, max_sequence_length):
        return self.text(prompts)

    def noise(self, batch, height, width, generator):
        self.rendered += batch
        return torch.randn(batch, 4, height // POOL, width // POOL, generator=generator)

    def decode(self, latents):
        return torch.sigmoid(latents[:, :3]).repeat_interleave(POOL, 2).repeat_interleave(POOL, 3)


def test_make_dataset_renders_every_bucket_and_resumes(tmp_path, monkeypatch):
    from distill import make_dataset, teacher_data

    pipe = FakePipeline()
    monkeypatch.setattr(teacher_data, "make_pipeline", lambda args: pipe)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n\na bird\n")
    argv = ["--model", "unused", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "d"),
            "--images-per-bucket", "2", "--steps", "2", "--batch-size", "3"]
    assert make_dataset.main(argv) == 0 and pipe.rendered == 10
    examples = read_folder(tmp_path / "d")
    assert len(examples) == 10 and {e.prompt for e in examples} == {"a cat", "a dog", "a bird"}
    from PIL import Image

    for e in examples:
        w, h = map(int, e.file.split("_")[0].split("x"))
        assert (w, h) in BUCKETS_512 and Image.open(tmp_path / "d" / e.file).size == (w, h)
    first = (tmp_path / "d" / "512x512_000001.png").read_bytes()
    # killed after writing a PNG but before listing it: that one image is rendered again, identically
    meta = tmp_path / "d" / "metadata.jsonl"
    meta.write_text("".join(ln + "\n" for ln in meta.read_text().splitlines() if "512x512_000001" not in ln))
    assert make_dataset.main(argv) == 0 and pipe.rendered == 11
    assert (tmp_path / "d" / "512x512_000001.png").read_bytes() == first
    assert len(read_folder(tmp_path / "d")) == 10
    assert make_dataset.main([*argv[:-4], "--steps", "3", "--batch-size", "3"]) == 2  # other settings


def test_a_damaged_cache_plan_is_one_line_that_says_to_rebuild(tmp_path):
    """cache.json cut short (a disk filled mid-write by another tool, a hand edit) or holding another JSON value:
    training and a rebuild both say so in one line instead of a JSONDecodeError traceback."""
    cache = make_cache(tmp_path)
    plan = cache.folder / "cache.json"
    assert not list(cache.folder.glob(".cache.json*"))  # written through a temp of its own, gone after
    for text, says in (('{"items": [', "unreadable"), ("[1, 2]", "not a cache plan (a JSON list")):
        plan.write_text(text)
        for load in (lambda: Cache(cache.folder), lambda: make_cache(tmp_path)):
            with pytest.raises(DataError) as e:
                load()
            assert "\n" not in str(e.value) and says in str(e.value) and "run again to rebuild it" in str(e.value)
