"""Training data: a cache of latents and text embeddings of a dataset folder (distill/dataset.py reads it), and
the batches each step trains on.

Training reads only the cache, so neither the text encoders nor the VAE are loaded while the transformer
trains (the text encoders alone outweigh the LoRA's whole training state). The cache folder holds

    cache.json              the plan: key (encoder identities, T5 length, resolution), items, prompts
    text-00000.safetensors  {name}.{p} for prompts p of the shard (deduplicated prompts), one tensor per
                            conditioning name: Flux txt (T, C) and y (V,); SD3 context (T, C) and pooled (V,)
    latents-00000.safetensors  {i} (C, h, w) normalised latents for items i of the shard
    samples.safetensors     embeddings of the sample prompts (sample images without a text encoder)
    negative.safetensors    {name}.0: the negative prompt's embeddings, once (SD3.5's CFG: the empty prompt)

Each shard is written atomically, so an interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from weights.atomic import atomic_path, atomic_save
from weights.io import read_json_object

from .dataset import (
    DataError,
    buckets_at,
    image_identity,
    image_size,
    load_image,
    mirror_caption,
    nearest_bucket,
    read_folder,
    sample_chunks,
)

CACHE_VERSION = 1

TextEncoder = Callable[[list[str]], dict[str, Tensor]]  # prompts -> {name: (B, ...)}, e.g. txt / y
COND_NAMES = ("txt", "y")  # Flux's; a plan's "cond_names" says otherwise (SD3: context, pooled)
ImageEncoder = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [0, 1] -> normalised latents (B, C, h, w)


# ----- the cache --------------------------------------------------------------------------------------------


def file_identity(path: str | Path | None, *, named: bool = True) -> str | None:
    """A cheap content fingerprint of a weights file or folder: sizes, headers and three sampled chunks.

    Reading whole multi-GB encoders would take minutes; a fine-tune changes every chunk, and the safetensors
    header (names, shapes, offsets) changes with any layout difference. `named=False`: a single file's own name
    is left out (a folder's files are named relative to it either way), so the same file renamed matches.
    """
    if not path:
        return None
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (an encoder or tokenizer for the cache)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if f != path else f.name if named else ''}:{size}".encode())
        sample_chunks(digest, f, size, 65536)
    return digest.hexdigest()[:16]


def weights_identity(model: str) -> str | None:
    """The model's weights' fingerprint (file_identity, a single file's own name left out: the same weights
    renamed or moved are the same model), None for a preset name (`tiny`)."""
    path = Path(model).expanduser()
    return file_identity(path, named=False) if path.exists() else None


# The plan fields a cache's fingerprint leaves out, as checkpoints recorded it: now, then the older ones (from
# before the data folder's path was left out, and from before the sample prompts were too), which also leave out
# the kohya repeat counts planned after them. A field a plan lacks changes nothing, so each digest of an older plan
# is byte for byte what was recorded then.
LEFT_OUT = (("sample_prompts", "data"), ("sample_prompts", "repeats"), ("repeats",))


# The cache is ours, made from the data: a damaged plan is rebuilt, not mended.
DAMAGED_PLAN_FIX = "delete the cache folder (--cache, default <output>/cache) and run again to rebuild it"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _shards(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


class Cache:
    """Read side of a built cache: items, their buckets, and batches of (x0, cond)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        plan_file = self.folder / "cache.json"
        if not plan_file.exists():
            raise DataError(f"{self.folder}: no cache here (no cache.json); build it first")
        self.plan = read_json_object(plan_file, DAMAGED_PLAN_FIX, "a cache plan", DataError)
        missing = [name for name in self.shard_names() if not (self.folder / name).exists()]
        if missing:
            raise DataError(f"{self.folder}: incomplete cache ({len(missing)} shards missing); "
                            "run again to finish it")
        self.buckets: list[tuple[int, int]] = [tuple(it["bucket"]) for it in self.plan["items"]]
        self.repeats: list[int] | None = self.plan.get("repeats")  # per item, times per epoch (kohya folders)
        self.prompt_of: list[int] = [it["prompt"] for it in self.plan["items"]]
        self._handles: dict[str, object] = {}

    def shard_names(self) -> list[str]:
        p = self.plan
        text, items = (len(_shards(len(p[k]), p["shard_size"])) for k in ("prompts", "items"))
        names = [f"text-{k:05d}.safetensors" for k in range(text)]
        names += [f"latents-{k:05d}.safetensors" for k in range(items)]
        names += ["samples.safetensors"] if p.get("sample_prompts") else []
        return names + (["negative.safetensors"] if p.get("negative_prompt") is not None else [])

    @property
    def cond_names(self) -> tuple[str, ...]:
        return tuple(self.plan.get("cond_names", COND_NAMES))

    def __len__(self) -> int:
        return len(self.plan["items"])

    @property
    def key(self) -> dict:
        return self.plan["key"]

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel of the VAE that built the cache (item 0's bucket width over its latent
        width): sample images need it, and a run without --vae has no VAE to ask."""
        return self.buckets[0][0] // self._get("latents-00000.safetensors", "0").shape[-1]

    def _digest_without(self, *fields: str) -> str:
        return _digest({k: v for k, v in self.plan.items() if k not in fields})

    def fingerprint(self) -> str:
        """Changes whenever the training data could: checkpoints store it to refuse a mismatched resume. Left out:
        the sample prompts (build_cache lets a run change them: only those are embedded again) and the data
        folder's path (a moved dataset or run folder is the same data: its items carry their files' identity)."""
        return self._digest_without(*LEFT_OUT[0])

    def fingerprints_before_repeats(self) -> tuple[str, ...]:
        """What a checkpoint of a run begun before this cache's plan learnt its kohya repeat counts recorded for it:
        each form `fingerprints` accepts, without the counts (every older form predates them)."""
        return tuple(self._digest_without(*fields, "repeats") for fields in LEFT_OUT)

    def fingerprints(self) -> tuple[str, ...]:
        """The fingerprint, and those older checkpoints carry: with the data path, and with the sample prompts."""
        return tuple(self._digest_without(*fields) for fields in LEFT_OUT)

    def _get(self, shard: str, key: str) -> Tensor:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt", device="cpu")
        return self._handles[shard].get_tensor(key)

    def _stacked(self, shard_of: Callable[[int], str], ids: Sequence[int]) -> dict[str, Tensor]:
        return {name: torch.stack([self._get(shard_of(p), f"{name}.{p}") for p in ids])
                for name in self.cond_names}

    def load(self, indices: Sequence[int]) -> tuple[Tensor, dict[str, Tensor]]:
        """x0 (B, C, h, w) and cond {name: (B, ...)} (Flux txt (B, T, C), y (B, V)); one bucket only."""
        if len({self.buckets[i] for i in indices}) != 1:
            raise ValueError("a batch must come from one bucket")
        size = self.plan["shard_size"]
        x0 = torch.stack([self._get(f"latents-{i // size:05d}.safetensors", str(i)) for i in indices])
        prompts = [self.prompt_of[i] for i in indices]
        return x0, self._stacked(lambda p: f"text-{p // size:05d}.safetensors", prompts)

    def sample_cond(self) -> tuple[list[str], dict[str, Tensor]] | None:
        prompts = self.plan.get("sample_prompts") or []
        if not prompts:
            return None
        return prompts, self._stacked(lambda _: "samples.safetensors", range(len(prompts)))

    def negative_cond(self) -> dict[str, Tensor] | None:
        """The negative prompt's embeddings {name: (1, ...)}, or None if the plan has no negative prompt."""
        if self.plan.get("negative_prompt") is None:
            return None
        return self._stacked(lambda _: "negative.safetensors", [0])


def plan_cache(data: str | Path, key: dict, resolution: int, sample_prompts: Sequence[str] = (),
               shard_size: int = 256, *, cond_names: Sequence[str] = COND_NAMES,
               negative_prompt: str | None = None, flip: bool = False) -> dict:
    """Which items go into which bucket, and the deduplicated prompts; a pure function of folder + key.
    `cond_names`: what the text encoder returns; `negative_prompt`: embedded once (SD3.5's CFG: "").
    `flip`: every image a second time, mirrored left-right (item "flip": true), under its mirrored caption
    (`mirror_caption`, embedded like any prompt), so image and caption still agree."""
    data = Path(data).expanduser()
    examples = read_folder(data)
    buckets = buckets_at(resolution)
    prompts = list(dict.fromkeys(e.prompt for e in examples))
    index = {p: k for k, p in enumerate(prompts)}
    items, upscaled = [], []
    for e in examples:
        path = data / e.file
        size = path.stat().st_size
        shape = image_size(path)
        bucket = nearest_bucket(*shape, buckets)
        factor = max(bucket[0] / shape[0], bucket[1] / shape[1])  # load_image's: cover the bucket, then crop
        if factor > 1:
            upscaled.append((factor, e.file, shape, bucket))
        items.append({"file": e.file, "prompt": index[e.prompt], "bytes": size, "id": image_identity(path, size),
                      "bucket": list(bucket)})
    if upscaled:
        _say_upscaled(data, upscaled, len(examples), resolution)
    if flip:  # after the originals: a plan without flip keeps its item numbers (and its caches stay valid)
        for item in list(items):
            mirrored = mirror_caption(prompts[item["prompt"]])
            if mirrored not in index:
                index[mirrored] = len(prompts)
                prompts.append(mirrored)
            items.append({**item, "prompt": index[mirrored], "flip": True})
    plan = {"version": CACHE_VERSION, "key": key, "data": str(data.resolve()), "shard_size": shard_size,
            "prompts": prompts, "items": items, "sample_prompts": list(sample_prompts)}
    repeats = [e.repeats for e in examples] * (2 if flip else 1)  # a mirrored image repeats as its original
    if any(n != 1 for n in repeats):  # kept out of the items: it changes the batches, not what is cached
        plan["repeats"] = repeats
    if tuple(cond_names) != COND_NAMES:  # Flux plans stay as they were, so their caches stay valid
        plan["cond_names"] = list(cond_names)
    if negative_prompt is not None:
        plan["negative_prompt"] = negative_prompt
    return plan


def _say_upscaled(data: Path, upscaled: list, total: int, resolution: int) -> None:
    """One line for the images smaller than their bucket: they train blurred (upscaled), so the fix is named."""
    factor, file, (w, h), (bw, bh) = max(upscaled)
    smaller = max(64, int(resolution / factor) // 64 * 64)  # where the most upscaled image about fits its bucket
    warnings.warn(f"{data}: {len(upscaled)} of {total} images are smaller than their bucket and are upscaled, up to "
                  f"{factor:.1f}x ({file}: {w}x{h} -> {bw}x{bh}); pass --resolution {smaller} or larger images",
                  stacklevel=3)


def build_cache(folder: str | Path, plan: dict, text_encoder: Callable[[], TextEncoder],
                image_encoder: Callable[[], ImageEncoder], *, batch_size: int = 8,
                dtype: torch.dtype | None = None, progress: bool = True) -> Cache:
    """Write every missing shard of `plan` into `folder`; the factories build encoders only when needed.

    An existing cache with another plan (other encoders, T5 length, resolution or dataset) is refused, never
    overwritten: its key says what differs.
    """
    from tqdm import tqdm

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "cache.json"
    if plan_file.exists():
        old = read_json_object(plan_file, DAMAGED_PLAN_FIX, "a cache plan", DataError)
        if old.get("items") and "id" not in old["items"][0]:  # built before items kept their image's identity
            plan = {**plan, "items": [{k: v for k, v in it.items() if k != "id"} for it in plan["items"]]}
        fields = ("key", "items", "prompts", "shard_size", "version", "cond_names", "negative_prompt")
        what = [k for k in fields if old.get(k) != plan.get(k)]
        if what:
            raise DataError(f"{folder}: a cache built with a different {'/'.join(what)} is there; "
                            "delete it or choose another cache folder")
        if old.get("sample_prompts") != plan["sample_prompts"]:  # new sample prompts: re-embed only those
            (folder / "samples.safetensors").unlink(missing_ok=True)
            _write_json(plan_file, plan)
        elif old.get("repeats") != plan.get("repeats") or old.get("data") != plan["data"]:
            _write_json(plan_file, plan)  # other kohya repeat counts, or the same items in a moved folder
    else:
        _write_json(plan_file, plan)
    size, data = plan["shard_size"], Path(plan["data"])

    def cast(t: Tensor) -> Tensor:
        return (t if dtype is None else t.to(dtype)).cpu()

    text_jobs = [(k, r) for k, r in enumerate(_shards(len(plan["prompts"]), size))
                 if not (folder / f"text-{k:05d}.safetensors").exists()]
    samples_missing = bool(plan["sample_prompts"]) and not (folder / "samples.safetensors").exists()
    negative = plan.get("negative_prompt")
    negative_missing = negative is not None and not (folder / "negative.safetensors").exists()
    names = plan.get("cond_names", COND_NAMES)
    if text_jobs or samples_missing or negative_missing:
        encode = text_encoder()
        bar = tqdm(total=sum(len(r) for _, r in text_jobs), desc="caching text", unit="prompt",
                   disable=not progress)
        for k, r in text_jobs:
            tensors = {}
            for chunk in _shards(len(r), batch_size):
                ids = [r[j] for j in chunk]
                cond = encode([plan["prompts"][p] for p in ids])
                tensors |= {f"{name}.{p}": cast(cond[name][row])
                            for name in names for row, p in enumerate(ids)}
                bar.update(len(ids))
            atomic_save(tensors, folder / f"text-{k:05d}.safetensors")
        bar.close()
        if samples_missing:
            cond = encode(list(plan["sample_prompts"]))
            n = len(plan["sample_prompts"])
            tensors = {f"{name}.{i}": cast(cond[name][i]) for name in names for i in range(n)}
            atomic_save(tensors, folder / "samples.safetensors")
        if negative_missing:
            cond = encode([negative])
            atomic_save({f"{name}.0": cast(cond[name][0]) for name in names}, folder / "negative.safetensors")
        del encode

    latent_jobs = [(k, r) for k, r in enumerate(_shards(len(plan["items"]), size))
                   if not (folder / f"latents-{k:05d}.safetensors").exists()]
    if latent_jobs:
        encode = image_encoder()
        bar = tqdm(total=sum(len(r) for _, r in latent_jobs), desc="caching latents", unit="image",
                   disable=not progress)
        for k, r in latent_jobs:
            tensors, by_bucket = {}, {}
            for i in r:
                by_bucket.setdefault(tuple(plan["items"][i]["bucket"]), []).append(i)
            for bucket, ids in by_bucket.items():
                for chunk in _shards(len(ids), batch_size):
                    batch = [ids[j] for j in chunk]
                    images = torch.stack([_item_image(data, plan["items"][i], bucket) for i in batch])
                    for i, z in zip(batch, encode(images)):
                        tensors[str(i)] = cast(z)
                    bar.update(len(batch))
            atomic_save(tensors, folder / f"latents-{k:05d}.safetensors")
        bar.close()
    return Cache(folder)


def _item_image(data: Path, item: dict, bucket: tuple[int, int]) -> Tensor:
    image = load_image(data / item["file"], bucket)
    return image.flip(-1) if item.get("flip") else image


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:  # a temp of our own, flushed before the rename
        tmp.write_text(json.dumps(obj, indent=1))


# ----- batches: which items each step trains on -------------------------------------------------------------


class BucketBatches:
    """Global batch of step s, a pure function of (seed, s): resuming at step s needs nothing but s.

    Per epoch e (a generator seeded by (seed, e)): each bucket's items are shuffled and cut into batches of
    `batch_size`, the last one topped up from the start of the same shuffle (so a bucket smaller than a batch,
    as in few-shot distillation, still trains); then all batches are shuffled together.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 repeats: Sequence[int] | None = None):
        self.batch_size, self.seed = batch_size, seed
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):  # an item of a kohya `N_concept` folder is in its bucket's epoch N times
            self.groups.setdefault(tuple(b), []).extend([i] * (repeats[i] if repeats else 1))
        if not self.groups:
            raise DataError("empty dataset: nothing to train on")
        self.per_epoch = sum(math.ceil(len(v) / batch_size) for v in self.groups.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of step `step` (0-based)."""
        return divmod(step, self.per_epoch)

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            # modulo torch's seed range: a seed above ~1.8e13 made this product overflow it mid-run
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            batches = []
            for key in sorted(self.groups):
                items = self.groups[key]
                order = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
                n = math.ceil(len(order) / self.batch_size) * self.batch_size
                order = [order[j % len(order)] for j in range(n)]
                batches += [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]
            self._epoch = (epoch, [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()])
        return self._epoch[1]

    def batch(self, step: int) -> list[int]:
        epoch, k = self.position(step)
        return self._batches(epoch)[k]
