"""Checkpoints that lose nothing and survive being killed mid-write.

A checkpoint is a folder `step-000200/` with

    tensors.safetensors  every LoRA set (live, fast_ema, slow_ema, ...), the optimizer's tensors, RNG states
    state.json           step, data position, optimizer hyper-parameters, config, the tensors file's sha256

It is written into a hidden temp folder, flushed to disk, then renamed into place: a run killed at any moment
leaves either no new checkpoint or a complete one. On resume the sha256 is checked too, so a checkpoint
damaged afterwards (a full disk, a copy cut short) is skipped with a warning and the previous one is used; when
every one is damaged, resuming is refused rather than silently starting over on top of them.

A checkpoint is never written with a NaN or an infinity in it (a diverged run): the newest checkpoint is always
one a lower-lr `--resume` can continue from. A write that fails (a full disk) leaves the previous one as it was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from weights.atomic import atomic_path, durable_replace, temp_beside, temp_writer_gone
from weights.io import file_sha256, stream_sha256

from .config import DistillConfig, flat_fields
from .sharding import full, like

STEP_DIR = re.compile(r"step-(\d{6,})")
# Fields a resumed run must share with the checkpoint: anything else changing would silently make the
# "resumed" run a different run.
RESUME_FIXED = ("objective", "rank", "alpha", "targets", "seed", "batch_size", "t_skip", "teacher_steps_min",
                "teacher_steps_max", "teacher_ratio", "non_shortcut_ratio", "dynamic_shift_prob", "shift_min",
                "shift_max", "guidance_max", "cfg_scale", "fast_decay", "slow_decay", "ema_restart_every",
                "teacher_lora", "base_loras")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, or a run with none left to resume from, as one line."""


def first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The key of the first floating-point tensor holding a NaN or an infinity, None when all are finite."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


def _what(key: str) -> str:
    """A checkpoint key as the user knows it: `lora.live.M.lora_up` is LoRA set 'live', tensor M.lora_up."""
    kind, _, rest = key.partition(".")
    if kind == "lora":
        lora_set, _, name = rest.partition(".")
        return f"LoRA set {lora_set!r} (first bad tensor {name})"
    return f"the optimizer state (first bad tensor {rest})" if kind == "optim" else f"tensor {key}"


def check_finite(root: Path, step: int, tensors: dict[str, Tensor]) -> None:
    """Refuse to checkpoint a diverged run. The trainer skips NaN/inf *steps* (max_bad_steps) and advises
    "lower lr, then --resume"; weights that went non-finite anyway (an update with a huge lr) must not replace
    the checkpoint that advice resumes from."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"step {step}: {_what(bad)} holds NaN/inf: the run diverged; checkpoint not written, "
                              f"{_kept(root)}: lower --lr, then --resume")


def disk_fix(e: OSError) -> str:
    """The fix a failed write's errno calls for: space for a full disk, not for a file in the way."""
    if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return "move the file in the way aside (or choose another --output)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make that folder writable (or choose another --output)"
    return "free some space (or fix the folder)"  # ENOSPC, EDQUOT, EFBIG, and a writer's error without errno


def _kept(root: Path) -> str:
    found = checkpoints(root)
    return f"{found[-1]} is kept" if found else f"no earlier checkpoint in {root} (--resume starts at step 0)"


def save_checkpoint(root: Path, step: int, tensors: dict[str, Tensor], state: dict, keep: int) -> Path:
    """Write `root/step-{step}` atomically, then delete all but the newest `keep` checkpoints up to `step`.
    CheckpointError (one line) for non-finite tensors or a failed write; the previous checkpoints stay."""
    check_finite(root, step, tensors)
    final = root / f"step-{step:06d}"
    tmp = aside = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(final, folder=True)  # `.step-*.tmp`, which clean_temp removes; the user's umask
        tensor_file = tmp / "tensors.safetensors"
        with atomic_path(tensor_file) as t:  # for its mode: save_file alone makes 0600
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(t))
        state = {**state, "step": step, "tensors_sha256": file_sha256(tensor_file)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # the same step written again (a resumed run): the old folder moves aside, not away,
            aside = temp_beside(final, folder=True)  # so that a failed rename below can put it back
            os.replace(final, aside)  # onto the empty temp folder: a rename, where an rmtree took a while
        durable_replace(tmp, final)  # its files on the disk before the rename makes them visible, root's after
    except OSError as e:  # a full disk, a folder made read-only meanwhile: the run stops, its checkpoints stay
        _put_back(aside, final)  # before the message counts what is kept
        raise CheckpointError(f"step {step}: checkpoint not written to {root} ({e.strerror or e}); "
                              f"{_kept(root)}: {disk_fix(e)}, then --resume") from None
    finally:  # whatever else stopped the write (a Ctrl-C between the renames): the old step goes back too
        _put_back(aside, final)
        for t in (tmp, aside):
            if t is not None and t.exists():
                shutil.rmtree(t, ignore_errors=True)
    # Only this run's own line counts: a higher step is one a resume skipped as damaged (resumes go on from the
    # newest intact one), and counting it would delete the checkpoints written since, this one included.
    for old in [p for p in checkpoints(root) if step_of(p) <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _put_back(aside: Path | None, final: Path) -> None:
    """A step written again whose new folder never took its place: the old one, moved aside, returns."""
    if aside is not None and aside.exists() and not final.exists():
        os.replace(aside, final)


def step_of(path: Path) -> int:
    """The step of a checkpoint folder `step-000200`."""
    return int(STEP_DIR.fullmatch(path.name).group(1))


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (leftover temp folders of killed writes are not listed)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)), key=step_of)


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, state) of one checkpoint folder; ValueError (one line) if it is incomplete or damaged,
    FileNotFoundError if it was deleted or replaced while being read (a run writing there pruned it). Both files are
    opened before either is read, and the tensors loaded are the bytes hashed, so the state of one version of the
    folder never comes back with the tensors of another."""
    state_file, tensor_file = path / "state.json", path / "tensors.safetensors"
    if not state_file.exists() or not tensor_file.exists():
        raise ValueError(f"{path}: incomplete checkpoint")
    with open(state_file, "rb") as s, open(tensor_file, "rb") as t:
        try:
            state = json.loads(s.read())
        except ValueError:
            raise ValueError(f"{path}: state.json is damaged") from None
        if stream_sha256(t) != state.get("tensors_sha256"):
            raise ValueError(f"{path}: tensors.safetensors does not match its recorded sha256 (damaged)")
        tensors = load_file(str(tensor_file))  # by name: the file is the one hashed if the name still leads to it
        if not os.path.samestat(os.fstat(t.fileno()), os.stat(tensor_file)):
            raise FileNotFoundError(f"{path}: replaced while being read")
    return tensors, state


def run_settings(state: dict) -> dict:
    """The run's config fields as its checkpoint stored them, by flat name (DistillConfig.to_dict, before and after
    the tables nested): JSON lists become the tuples they were; fields newer than the checkpoint are absent."""
    fields = flat_fields()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items() if k in fields}


def stored_config(state: dict) -> DistillConfig:
    """The run's config as its checkpoint stored it (fields newer than the checkpoint keep their defaults); W&B
    is not needed to read it."""
    return DistillConfig.from_flat(**{**run_settings(state), "wandb_project": ""})


def newest_settings(root: Path) -> dict | None:
    """run_settings of the newest checkpoint in `root` whose state.json reads, None without one: what `--resume`
    starts from (the trainer then checks the tensors, and skips a damaged checkpoint as it does)."""
    for path in reversed(checkpoints(root)):
        try:
            return run_settings(json.loads((path / "state.json").read_text()))
        except (OSError, ValueError, KeyError, AttributeError):
            continue
    return None


# Fields a resume may change, which change the numbers from there on (not only speed or memory): said in one line,
# as the optimizer's are (resume.apply_optimizer_config), so that a resumed run's log can be read.
RESUME_SAID = ("lr_schedule", "lr_final", "max_grad_norm", "dtype", "autocast", "fp8_base", "fp8_compute",
               "micro_batch")


def resume_conflicts(state: dict, config: DistillConfig) -> list[str]:
    """The RESUME_FIXED fields in which `config` differs from the checkpoint's run."""
    stored = stored_config(state)
    return [k for k in RESUME_FIXED if stored.get(k) != config.get(k)]


def resume_changes(state: dict, config: DistillConfig) -> list[str]:
    """The RESUME_SAID fields in which `config` differs from the checkpoint's run, as 'name old -> new'."""
    stored = stored_config(state)
    return [f"{k} {stored.get(k)} -> {config.get(k)}" for k in RESUME_SAID if stored.get(k) != config.get(k)]


def model_record(family: str, config, weights: str | None = None) -> dict:
    """The model a checkpoint was trained on, as its state.json stores it (JSON types: tuples as lists): its family,
    config and, where it is a file or folder, its weights' fingerprint (`weights_identity`)."""
    record = {"family": family, "config": config.to_dict()} | ({"weights": weights} if weights else {})
    return json.loads(json.dumps(record))


def other_model(stored: dict | None, now: dict) -> str:
    """'' when a checkpoint's model record is the model `now` describes (or it has none: checkpoints before
    2026-11-23 record none; the weights' fingerprint is compared where both have one, since 2026-12-05), else what
    differs, in words."""
    if stored is None:
        return ""
    if stored.get("family") != now["family"]:
        return f"a {stored.get('family')} model; this one is {now['family']}"
    old, new = stored.get("config", {}), now["config"]
    diff = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if not diff and stored.get("weights") and now.get("weights") and stored["weights"] != now["weights"]:
        return "the same architecture with other weights (another fine-tune?)"
    return ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")


def lora_files(base_loras: list[dict], teacher_lora: str) -> dict:
    """The LoRA files a run's teacher is made of, by content: each base LoRA's record (file, scale, sha256) and
    the teacher LoRA's sha256 (its PEFT folder's adapter file), as a checkpoint stores them."""
    from weights.lora_foreign import peft_file

    teacher = file_sha256(peft_file(Path(teacher_lora).expanduser())) if teacher_lora else None
    return {"base_loras": base_loras, "teacher_lora_sha256": teacher}


def changed_lora_files(state: dict, now: dict) -> list[str]:
    """The flags whose files differ by content from those the checkpoint's run trained with (the paths are
    RESUME_FIXED's; a file replaced at the same path is caught here). Checkpoints without the record: none."""
    changed = []
    if "base_loras" in state and [b["sha256"] for b in state["base_loras"]] != [b["sha256"] for b in
                                                                               now["base_loras"]]:
        changed.append("--base_loras")
    if state.get("teacher_lora_sha256") not in (None, now["teacher_lora_sha256"]):
        changed.append("--teacher_lora")
    return changed


def latest_checkpoint(root: Path, looks: int = 3) -> tuple[Path, dict[str, Tensor], dict] | None:
    """The newest checkpoint that reads back intact; damaged newer ones are skipped with a warning. None when
    `root` holds no checkpoint; CheckpointError (one line, naming each) when it holds only damaged ones: the
    run's state would be lost by treating that as "no checkpoint".

    A run training in `root` deletes its older checkpoints after writing a newer one (--keep_checkpoints), oldest
    first, so a reader that listed them before may find every one it listed gone. That is not damage: when every
    read failed and a file vanished mid-read or the listing changed meanwhile, the folder is listed again and the
    newer checkpoint read (up to `looks` times)."""
    for _ in range(looks):
        listed, damaged = checkpoints(root), []
        for path in reversed(listed):
            try:
                tensors, state = read_checkpoint(path)
            except (ValueError, OSError) as e:
                damaged.append((path, e))
                continue
            for _, e in damaged:
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
            return path, tensors, state
        if not any(isinstance(e, FileNotFoundError) for _, e in damaged) and checkpoints(root) == listed:
            break  # nothing changed while reading: the damage is real
    else:
        raise CheckpointError(f"{root}: its checkpoints were deleted while being read, {looks} times in a row (a "
                              "run writing there with --keep_checkpoints 1?); try again, or once that run stops")
    if damaged:
        why = "; ".join(f"{p.name}: {str(e).removeprefix(f'{p}: ')}" for p, e in damaged[:3])
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise CheckpointError(f"{root}: every checkpoint is damaged ({why}{more})")
    return None


def clean_temp(root: Path) -> None:
    """Remove the temp folders (`.step-*.tmp`) of checkpoint writes whose process is gone: a killed run's.
    A live writer's folder (another run writing here now, say) and any name whose writer cannot be told are
    kept (weights/atomic.py `temp_writer_gone`)."""
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            if temp_writer_gone(p):
                shutil.rmtree(p, ignore_errors=True)


# ----- RNG and optimizer state as tensors + JSON ------------------------------------------------------------


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """Every global RNG the run could touch. Our draws are keyed by (seed, step, element), so restoring these
    matters only for code outside the objective (a user's hook), but a resume should restore everything."""
    import random

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, {"python_random": _jsonable(random.getstate())}


def set_rng_state(tensors: dict[str, Tensor], state: dict) -> None:
    import random

    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "python_random" in state:
        random.setstate(_tupled(state["python_random"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], dict]:
    """Per-parameter tensors keyed by parameter name (not position), hyper-parameters as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{names[idx]}.{key}"] = full(value)  # sharded: gathered (every process calls)
            else:
                scalars[f"{names[idx]}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "param_names": names}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, Tensor],
                         state: dict) -> None:
    if state["param_names"] != names:
        raise ValueError("checkpoint's LoRA parameters differ from this run's (other targets or model?)")
    per_param: dict[int, dict] = {}
    for idx, name in enumerate(names):
        prefix = f"optim.{name}."
        # keys are `{name}.{field}` with a dot-free field, so a name that prefixes another cannot capture it
        entry = {k[len(prefix):]: v for k, v in tensors.items()
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        entry.update({k[len(name) + 1:]: v for k, v in state["scalars"].items()
                      if k.startswith(name + ".") and "." not in k[len(name) + 1:]})
        if entry:
            per_param[idx] = entry
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, entry in per_param.items():  # moments of a sharded parameter are sharded like it
        entry.update({k: like(params[idx], v) for k, v in entry.items()
                      if isinstance(v, Tensor) and v.shape == params[idx].shape})
    current = optimizer.state_dict()
    groups = [{**saved, "params": g["params"]}
              for saved, g in zip(state["param_groups"], current["param_groups"], strict=True)]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
