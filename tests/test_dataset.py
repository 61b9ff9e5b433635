"""Dataset folders as users bring them (distill/dataset.py): kohya / ai-toolkit caption files, diffusers' metadata
rows, hidden and linked files, phone photos with an EXIF orientation, 16-bit PNGs; and the cache noticing an image
replaced by another of the same size (distill/data.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import BucketBatches, Cache, build_cache, plan_cache
from distill.dataset import (
    BUCKETS_512,
    DataError,
    buckets_for,
    image_size,
    load_image,
    mirror_caption,
    read_folder,
)


def png(path, size=(8, 8), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_caption_files_kohya_spellings_hidden_and_uncaptioned(tmp_path):
    """.txt or kohya's .caption (the .txt first), a UTF-8 BOM dropped; AppleDouble twins and dot-folders are not
    data; images without a caption and those of a kohya folder with 0 repeats are said in one warning."""
    data = tmp_path / "d"
    png(data / "a.png")
    (data / "a.txt").write_text("\ufeffa red square", encoding="utf-8")  # Notepad's UTF-8
    png(data / "10_dog" / "b.png")
    (data / "10_dog" / "b.caption").write_text("a dog\n")
    png(data / "0_off" / "e.png")  # sd-scripts' zero repeats: never trained
    (data / "0_off" / "e.txt").write_text("left out")
    png(data / "c.png")
    (data / "c.txt").write_text("from the txt")
    (data / "c.caption").write_text("not this one")
    png(data / "d.png")  # no caption
    png(data / "f.png")
    (data / "f.txt").write_text("a cat, sitting\nblurry, low quality\n")  # kohya reads line 1 only: said
    (data / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata twin: not an image
    (data / "._a.txt").write_bytes(b"\x00\x05")
    png(data / ".ipynb_checkpoints" / "a-checkpoint.png")
    (data / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("a copy")
    with pytest.warns(UserWarning) as record:
        examples = read_folder(data)
    assert [(e.file, e.prompt) for e in examples] == [("10_dog/b.png", "a dog"), ("a.png", "a red square"),
                                                      ("c.png", "from the txt"),
                                                      ("f.png", "a cat, sitting\nblurry, low quality")]
    (message,) = [str(w.message) for w in record]
    assert ("1 caption files hold several lines, each file read whole as one prompt (sd-scripts reads the first "
            "line only), e.g. f.txt") in message
    assert "1 images have no caption file (.txt/.caption) and are left out, e.g. d.png" in message
    assert "the images of kohya folders with 0 repeats (0_off) are left out" in message
    assert "kohya repeat folders train their images N times per epoch: 10_dog x10" in message


def test_metadata_rows_bom_and_non_string_prompts(tmp_path):
    data = tmp_path / "d"
    png(data / "a.png")
    (data / "metadata.jsonl").write_text('\ufeff{"file_name": "a.png", "text": "a red square"}\n', encoding="utf-8")
    assert [(e.file, e.prompt) for e in read_folder(data)] == [("a.png", "a red square")]
    for row, bad in (({"file_name": "a.png", "prompt": None}, "prompt is NoneType"),
                     ({"file_name": "a.png", "text": ["one", "two"]}, "text is list"),
                     ({"file_name": 3, "prompt": "x"}, "file_name is int")):
        (data / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"metadata.jsonl:1: {bad}, not a string"):
            read_folder(data)
    with pytest.raises(DataError, match="a file, not a dataset folder; pass the folder"):
        read_folder(data / "a.png")


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_linked_folders_are_followed_once_and_a_broken_link_is_named(tmp_path):
    store = tmp_path / "store"
    png(store / "t.png")
    (store / "t.txt").write_text("a linked image")
    data = tmp_path / "d"
    data.mkdir()
    (data / "linked").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(data, target_is_directory=True)  # a link back up: walked once, no endless walk
    assert [e.file for e in read_folder(data)] == ["linked/t.png"]
    (data / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (data / "gone.txt").write_text("its target was deleted")
    with pytest.raises(DataError, match="gone.png: a broken link"):
        read_folder(data)


def test_phone_photos_are_read_upright(tmp_path):
    """A portrait photo stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to show): bucketed and
    read as the 64 x 128 portrait it shows, top red and bottom blue (lossless PNG: exact pixels)."""
    upright = Image.new("RGB", (64, 128), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 64, 64, 128))
    stored = upright.rotate(90, expand=True)  # counter-clockwise: orientation 6 turns it back
    assert stored.size == (128, 64)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    assert image_size(path) == (64, 128)
    got = load_image(path, (64, 128))
    want = torch.from_numpy(np.array(upright)).permute(2, 0, 1).float() / 255
    assert torch.equal(got, want)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    values = np.array([[0, 0x4000], [0x8000, 0xFFFF]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # what Pillow makes of a 16-bit PNG: convert("RGB") alone would clip it
    got = load_image(path, (8, 8))
    want = torch.from_numpy(np.round(values / 257)).float() / 255
    assert torch.equal(got, want.expand(3, 8, 8))


def test_buckets_turn_landscape_as_portrait():
    assert buckets_for(512) == BUCKETS_512  # the released list
    for resolution in (768, 1024):
        buckets = buckets_for(resolution)
        assert set(buckets) == {(h, w) for w, h in buckets} and all(w * h <= resolution ** 2 for w, h in buckets)
    assert (1280, 768) in buckets_for(1024)  # 16:9 images were cut to 1216 x 832 while 9:16 got 768 x 1280


def test_mirrored_captions_swap_the_side_words_forms():
    assert mirror_caption("the Leftmost tree, RIGHTWARDS, a leftover") == "the Rightmost tree, LEFTWARDS, a leftover"


def test_an_image_replaced_by_another_of_the_same_size_is_not_reused_from_the_cache(tmp_path):
    """A BMP's size depends on its dimensions alone: the red one replaced by a blue one must not keep the red
    latents; a cache from before the items kept their identity continues."""
    data = tmp_path / "d"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(data.mkdir() or data / "a.bmp")
    (data / "a.txt").write_text("a square")

    def build(cache):
        plan = plan_cache(data, {"k": 1}, 64)
        text = lambda p: {"txt": torch.zeros(len(p), 2, 4), "y": torch.zeros(len(p), 4)}  # noqa: E731
        return build_cache(cache, plan, lambda: text, lambda: lambda images: images[:, :, ::8, ::8].clone(),
                           progress=False)

    red = build(tmp_path / "c").load([0])[0]
    size = (data / "a.bmp").stat().st_size
    Image.new("RGB", (64, 64), (0, 0, 255)).save(data / "a.bmp")
    assert (data / "a.bmp").stat().st_size == size
    with pytest.raises(DataError, match="a cache built with a different items is there"):
        build(tmp_path / "c")
    blue = build(tmp_path / "fresh").load([0])[0]
    assert not torch.equal(red, blue)
    old = json.loads((tmp_path / "c" / "cache.json").read_text())  # as written before items had an "id"
    old["items"] = [{k: v for k, v in it.items() if k != "id"} for it in old["items"]]
    (tmp_path / "c" / "cache.json").write_text(json.dumps(old))
    assert torch.equal(build(tmp_path / "c").load([0])[0], red)  # an old cache: used as it was


def test_imagefolder_csv_and_a_dataset_one_folder_down(tmp_path):
    """diffusers' imagefolder also reads metadata.csv (a header line, then rows; commas inside quotes); a folder
    whose dataset sits in train/ is named in the refusal."""
    data = tmp_path / "d" / "train"
    png(data / "a.png")
    png(data / "b b.png")
    (data / "metadata.csv").write_text('file_name,text\na.png,"a red square, small"\nb b.png,a blue one\n',
                                       encoding="utf-8-sig")
    assert [(e.file, e.prompt) for e in read_folder(data)] == [("a.png", "a red square, small"),
                                                              ("b b.png", "a blue one")]
    with pytest.raises(DataError, match=r"empty dataset .*; a dataset one folder down\? pass --data .*train$"):
        read_folder(tmp_path / "d")
    (data / "metadata.csv").write_text("image,text\na.png,a red square\n")
    with pytest.raises(DataError, match=r"metadata.csv: its header line names no file_name column"):
        read_folder(data)


def test_kohya_repeat_folders_set_how_often_each_image_trains(tmp_path):
    """sd-scripts' `N_concept` folders: each image is in every epoch N times (the innermost N_ folder's N, flipped
    twins as their originals); a cache built before the counts were applied is kept (same tensors, nothing
    encoded again) and only learns them."""
    data = tmp_path / "d"
    for folder, name in (("3_dog", "a"), ("1_cat", "b"), (".", "c"), ("2_outer/5_inner", "d")):
        png(data / folder / f"{name}.png", (64, 64))
        (data / folder / f"{name}.txt").write_text(f"photo {name}")
    with pytest.warns(UserWarning, match="N times per epoch: 2_outer/5_inner x5, 3_dog x3$"):
        examples = read_folder(data)
    assert [(e.file, e.repeats) for e in examples] == [
        ("1_cat/b.png", 1), ("2_outer/5_inner/d.png", 5), ("3_dog/a.png", 3), ("c.png", 1)]
    text = lambda p: {"txt": torch.zeros(len(p), 2, 4), "y": torch.zeros(len(p), 4)}  # noqa: E731
    encoded = []

    def vae(images):
        encoded.append(len(images))
        return images[:, :, ::8, ::8].clone()

    with pytest.warns(UserWarning, match="repeat folders"):
        plan = plan_cache(data, {"k": 1}, 64, flip=True)
    assert plan["repeats"] == [1, 5, 3, 1] * 2
    old = {k: v for k, v in plan.items() if k != "repeats"}  # as planned before repeat counts were applied
    before = build_cache(tmp_path / "c", old, lambda: text, lambda: vae, progress=False)
    assert before.repeats is None and sum(encoded) == 8
    cache = build_cache(tmp_path / "c", plan, lambda: text, lambda: vae, progress=False)
    assert sum(encoded) == 8 and Cache(tmp_path / "c").repeats == [1, 5, 3, 1] * 2
    # a run begun on the cache as it was, whichever fingerprint form its checkpoint carries, is told apart
    assert set(before.fingerprints()) <= set(cache.fingerprints_before_repeats())
    assert cache.fingerprint() != before.fingerprint()
    batches = BucketBatches(cache.buckets, 4, seed=0, repeats=cache.repeats)
    assert batches.per_epoch == 5  # 20 draws in batches of 4
    for epoch in range(2):
        drawn = [i for s in range(5 * epoch, 5 * epoch + 5) for i in batches.batch(s)]
        assert sorted(drawn) == sorted(i for i, n in enumerate(cache.repeats) for _ in range(n))
