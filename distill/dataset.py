"""A training dataset as users bring it: a folder of images with captions, read into (file, prompt) examples, and
the images cut to aspect-ratio buckets. distill/data.py caches what these give.

Captions, by the first rule that applies to the folder:

    metadata.jsonl         one {"file_name": ..., "prompt" | "text" | "caption": ...} per line (make_dataset's
                           and diffusers' imagefolder layout), or metadata.csv with those columns
    IMAGE + IMAGE.txt      or IMAGE.caption (kohya / sd-scripts' other caption extension), in any subfolder

Files and folders whose names start with "." are not part of a dataset (macOS's `._x.png` AppleDouble twins,
`.ipynb_checkpoints/`, `.cache/`); symlinked files and folders are followed. Images without a caption file are left
out and counted in one line. A folder `python -m distill.make_dataset` made (its make_dataset.json) is read only
once that has finished it (`check_rendered`). An image inside a kohya `N_concept` folder (sd-scripts' DreamBooth
layout: "10_dog" trains each of its images 10 times per epoch) carries that repeat count, the innermost such
folder's; "0_x" leaves its images out, as sd-scripts does. A caption file of several lines is one prompt, read whole
(sd-scripts trains on its first line): said in the same line. Pixels are read upright (the EXIF orientation applied,
as every viewer shows them), 16-bit greyscale scaled to 8 bits, and alpha dropped as kohya and diffusers drop it
(`convert("RGB")`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import Tensor

from weights.atomic import lock_holder
from weights.io import read_json_object

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")  # in this order: a .txt beside a .caption wins
PROMPT_COLUMNS = ("prompt", "text", "caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the .jsonl first, as diffusers' imagefolder
# docs/method.md §7, (width, height): the released 512-px buckets; buckets_for(512) reproduces them
BUCKETS_512 = ((384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
_KOHYA_REPEATS = re.compile(r"^(\d+)_\S")  # sd-scripts' DreamBooth folders: "10_dog" trains each image 10 times


class DataError(ValueError):
    """A problem with a dataset or cache folder, as one line."""


@dataclass(frozen=True)
class Example:
    file: str  # relative to the dataset folder
    prompt: str
    repeats: int = 1  # times per epoch: a kohya `N_concept` folder's N


def inside_folder(folder: Path, name: str, where: str) -> Path:
    """folder / name, refused when `name` leaves the folder: absolute, a drive, or a `..` part (in / or \\ form).
    Checked on the name, not on the resolved path: a dataset of symlinks into a shared image store stays valid,
    while a metadata.jsonl row cannot make training read (or make_dataset trust) an arbitrary file."""
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    if not name or posix.is_absolute() or windows.anchor or ".." in posix.parts:
        raise DataError(f"{where}: file_name {name!r} is outside the dataset folder; list images by their path "
                        f"inside {folder} (copy the image there)")
    return folder / name


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Notepad's UTF-8) would reach CLIP as 3 tokens
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _unreadable(path: Path, error: Exception) -> DataError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return DataError(f"{path}: not a readable image ({reason}); replace it, or remove it and its caption / "
                     "metadata.jsonl row")


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, symlinked folders followed (each real folder once), hidden names out."""
    out, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree (or two links to one folder): walked once
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(root) / n for n in names if not n.startswith(".")]
    return sorted(out)


def _rows(meta: Path):
    """(line number, row dict) of a metadata.jsonl, or of a metadata.csv with a header line (diffusers'
    imagefolder reads both)."""
    text = _text(meta)
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise DataError(f"{meta}: its header line names no file_name column (it has {reader.fieldnames}); "
                            f"name the image column file_name and the caption one {' or '.join(PROMPT_COLUMNS)}")
        for row in reader:
            yield reader.line_num, row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{meta}:{n}: expected {{\"file_name\": ..., \"prompt\": ...}}") from None


def _from_metadata(folder: Path, meta: Path) -> list[Example]:
    out = []
    for n, row in _rows(meta):
        try:
            column = next(k for k in PROMPT_COLUMNS if k in row)
            prompt, name = row[column], row["file_name"]
        except (KeyError, StopIteration, TypeError):
            raise DataError(f"{meta}:{n}: expected {{\"file_name\": ..., \"prompt\": ...}}") from None
        if not isinstance(prompt, str) or not isinstance(name, str):  # null or a list would train on "None"
            bad = "file_name" if not isinstance(name, str) else column
            raise DataError(f"{meta}:{n}: {bad} is {type(row[bad]).__name__}, not a string; write it as text")
        inside_folder(folder, name, f"{meta}:{n}")
        out.append(Example(name, prompt))
    missing = [e.file for e in out if not (folder / e.file).is_file()]
    if missing:
        raise DataError(f"{meta}: {len(missing)} listed images are missing, e.g. {missing[0]}")
    return out


def _kohya_repeats(relative: Path) -> int:
    """The repeat count of the innermost `N_concept` folder above an image (1 outside any)."""
    counts = [int(m.group(1)) for p in relative.parts[:-1] if (m := _KOHYA_REPEATS.match(p))]
    return counts[-1] if counts else 1


def _from_caption_files(folder: Path) -> list[Example]:
    files = _files(folder)
    present = set(files)
    out, uncaptioned, zero, repeated, several = [], [], set(), {}, []
    for image in files:
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not image.is_file():  # a symlink to nothing: its path, not a full-disk advice from the OSError later
            raise DataError(f"{image}: a broken link (its target is gone); restore the target or remove the link")
        caption = next((c for s in CAPTION_SUFFIXES if (c := image.with_suffix(s)) in present), None)
        if caption is None:
            uncaptioned.append(image)
            continue
        relative = image.relative_to(folder)
        repeats = _kohya_repeats(relative)
        if repeats == 0:
            zero.add(str(relative.parent))
            continue
        if repeats > 1:
            repeated[str(relative.parent)] = repeats
        text = _text(caption).strip()
        if "\n" in text:
            several.append(caption.relative_to(folder))
        out.append(Example(str(relative), text, repeats))
    notes = []
    if uncaptioned:
        notes.append(f"{len(uncaptioned)} images have no caption file ({'/'.join(CAPTION_SUFFIXES)}) and are left "
                     f"out, e.g. {uncaptioned[0].relative_to(folder)}")
    if repeated:  # said, as "2024_trip" would repeat its images 2024 times just as in sd-scripts
        shown = ", ".join(f"{name} x{n}" for name, n in sorted(repeated.items())[:3])
        notes.append(f"kohya repeat folders train their images N times per epoch: {shown}"
                     + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""))
    if several:  # sd-scripts trains on the first line only (or a random one with its wildcard option)
        notes.append(f"{len(several)} caption files hold several lines, each file read whole as one prompt (sd-scripts "
                     f"reads the first line only), e.g. {several[0]}")
    if zero:
        notes.append(f"the images of kohya folders with 0 repeats ({', '.join(sorted(zero)[:3])}) are left out")
    if out and notes:
        warnings.warn(f"{folder}: " + "; ".join(notes), stacklevel=3)
    return out


def read_folder(folder: str | Path) -> list[Example]:
    """`metadata.jsonl` rows, else image + caption file pairs (the module docstring)."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise DataError(f"{folder}: a file, not a dataset folder; pass the folder that holds the images")
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder")
    check_rendered(folder)
    meta = next((m for name in METADATA_FILES if (m := folder / name).exists()), None)
    out = _from_metadata(folder, meta) if meta else _from_caption_files(folder)
    if not out:
        below = next((m.parent for name in METADATA_FILES for m in sorted(folder.glob(f"*/{name}"))), None)
        hint = f"; a dataset one folder down? pass --data {below}" if below else ""
        raise DataError(f"{folder}: empty dataset (no metadata.jsonl / .csv rows and no image + .txt / .caption "
                        f"pairs){hint}")
    return out


# ----- folders make_dataset renders ----------------------------------------------------------------------------

MAKE_DATASET_RECORD = "make_dataset.json"  # distill/teacher_data.py's record of its settings
FINISH_RENDERING = "rerun python -m distill.make_dataset with the same flags to finish it"
_RENDERED = re.compile(r"^(\d+)x(\d+)_(\d{6,})\.png$")  # teacher_data.plan_jobs' names: {W}x{H}_{j:06d}.png


def check_rendered(folder: Path) -> None:
    """Refuse a folder make_dataset made (its make_dataset.json) until make_dataset has finished it: every image its
    record plans (images_per_bucket in each bucket of its resolution) listed in metadata.jsonl and on the disk, and
    no make_dataset run rendering into it (its .scfm.lock, weights/atomic.py folder_lock, held by a live process).
    A half-rendered set would be cached and trained on without a word, and once make_dataset finished it the
    cache would refuse the finished set, so a --resume could not go on. A folder without the record is read as
    it is: renaming the record is how a partial set is trained on by choice (the message says so)."""
    record = folder / MAKE_DATASET_RECORD
    if not record.is_file():
        return
    keep = f"rename it if {folder} is not make_dataset's folder"
    settings = read_json_object(record, keep, "make_dataset's record of settings", DataError)
    per_bucket, resolution = settings.get("images_per_bucket"), settings.get("resolution")
    if not all(type(v) is int and 0 < v <= 1 << 20 for v in (per_bucket, resolution)):
        raise DataError(f"{record}: no images_per_bucket and resolution recorded, so whether make_dataset finished "
                        f"the folder is unknown; {keep}")
    buckets = set(buckets_at(resolution))  # teacher_data's buckets
    planned, done = per_bucket * len(buckets), _rendered(folder, buckets, per_bucket)
    holder = lock_holder(folder)  # a make_dataset rendering into it now (on a shared disk: another host's)
    if holder is not None:
        raise DataError(f"{folder}: a make_dataset run holds it ({holder}; {done} of {planned} images so far); "
                        f"wait for it to finish, then run again (delete {folder / '.scfm.lock'} only if that "
                        "process is gone)")
    if done < planned:
        raise DataError(f"{folder}: make_dataset rendered {done} of the {planned} images its {MAKE_DATASET_RECORD} "
                        f"plans; {FINISH_RENDERING} (to train on these {done} alone, rename {record.name} to "
                        "make_dataset.partial.json; renaming it back lets make_dataset finish the set later)")


def _rendered(folder: Path, buckets: set[tuple[int, int]], per_bucket: int) -> int:
    """How many of the images make_dataset plans are done: listed in metadata.jsonl (rows are written after their
    PNG; a row cut off by a kill is not one) and still there."""
    try:
        lines = (folder / "metadata.jsonl").read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]
    except OSError:  # no rows yet
        return 0
    done = set()
    for line in lines:
        try:
            name = json.loads(line)["file_name"]
        except (ValueError, KeyError, TypeError):
            continue  # not a row make_dataset wrote: the readers refuse it with its line number
        m = _RENDERED.match(name) if isinstance(name, str) else None
        if m and (int(m[1]), int(m[2])) in buckets and int(m[3]) < per_bucket and (folder / name).is_file():
            done.add(name)
    return len(done)


def sample_chunks(digest, path: Path, size: int, chunk: int) -> None:
    """Feed `digest` three `chunk`-byte samples of the file (start, middle, end): a cheap content fingerprint."""
    with open(path, "rb") as f:
        for offset in (0, size // 2, max(0, size - chunk)):
            f.seek(offset)
            digest.update(f.read(chunk))


def image_identity(path: Path, size: int) -> str:
    """A cheap fingerprint of an image file's content (its `size` and three sampled 4 KiB chunks): an image replaced
    by another of the same size gets other cached latents, not the old ones."""
    digest = hashlib.sha256(str(size).encode())
    sample_chunks(digest, path, size, 4096)
    return digest.hexdigest()[:12]


# ----- buckets ------------------------------------------------------------------------------------------------


def buckets_for(resolution: int, multiple: int = 64, max_aspect: float = 1.7) -> tuple[tuple[int, int], ...]:
    """(width, height) pairs in multiples of `multiple` under resolution^2 pixels: for each height at least the
    width, the widest width that fits, and the same buckets turned landscape, so that 16:9 and 9:16 images are cut
    alike (taking the widest fit for landscape heights too gave 768x1280 but only 1216x832 at 1024 px)."""
    area, portrait = resolution * resolution, []
    for h in range(multiple, 4 * resolution, multiple):
        w = area // h // multiple * multiple
        if multiple <= w <= h and h / w <= max_aspect:
            portrait.append((w, h))
    out = set(portrait) | {(h, w) for w, h in portrait}
    return tuple(sorted(out, key=lambda wh: wh[0] / wh[1]))


def buckets_at(resolution: int) -> tuple[tuple[int, int], ...]:
    """The buckets of `resolution`: the released 512-px list (which buckets_for(512) reproduces), else buckets_for's."""
    return BUCKETS_512 if resolution == 512 else buckets_for(resolution)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of closest aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))


# ----- pixels -------------------------------------------------------------------------------------------------

_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height (90 / 270 degrees, with or without a flip)


def _upright_rgb(im):
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)  # a phone's portrait JPEG is stored landscape with orientation 6
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit greyscale: convert("RGB") clips at 255
        import numpy as np

        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return im.convert("RGB")  # decodes the pixels: a truncated file fails here, not in Image.open


def load_image(path: Path, bucket: tuple[int, int]) -> Tensor:
    """(3, H, W) in [0, 1], upright: resized to cover the bucket, then centre-cropped to it."""
    from PIL import Image

    w, h = bucket
    try:
        with Image.open(path) as im:
            im = _upright_rgb(im)
            scale = max(w / im.width, h / im.height)
            size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
            if size != im.size:
                im = im.resize(size, Image.Resampling.LANCZOS)
            left, top = (im.width - w) // 2, (im.height - h) // 2
            im = im.crop((left, top, left + w, top + h))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways to fail a file
        raise _unreadable(path, e) from None
    return data.view(h, w, 3).permute(2, 0, 1).float() / 255.0


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as shown, the EXIF orientation applied, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112) in _TURNED else (w, h)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from None


# ----- captions of mirrored images ----------------------------------------------------------------------------

_SIDES = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)


def mirror_caption(text: str) -> str:
    """The caption of the image mirrored left-right: every whole word "left" and "right" swapped (and their
    -most / -ward(s) forms), its case kept ("at the top Left" -> "at the top Right"; "leftover", "bright"
    untouched)."""
    def swap(m: re.Match) -> str:
        side = m.group(1)
        word = {"left": "right", "right": "left"}[side.lower()]
        word = word.upper() if side.isupper() else word.capitalize() if side[0].isupper() else word
        return word + (m.group(2) or "")
    return _SIDES.sub(swap, text)
