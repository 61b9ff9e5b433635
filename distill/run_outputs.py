"""What a training run writes and says besides checkpoints: the JSONL log (and TensorBoard's or W&B's), the sample
images (SampleImages, a base of the Trainer), the one line for running out of GPU memory, and how Ctrl-C or a
scheduler's SIGTERM ends a run."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Self

import torch
import torch.distributed as dist
from torch import Tensor

from weights.atomic import atomic_path

from .checkpoint import checkpoints, disk_fix
from .lora import weight_set


def sample_side(size: int, downscale: int, patch: int) -> int:
    """Latent pixels per side of `size`-pixel sample images, for a VAE with `downscale` image pixels per latent
    pixel and a transformer that takes `patch` x `patch` latent pixels per token (Flux packs 2x2, the MMDiT
    patchifies)."""
    multiple = downscale * patch
    if size % multiple:
        fit = max(1, round(size / multiple)) * multiple
        raise ValueError(f"sample_size {size} is not a multiple of {multiple} (this VAE's {downscale} pixels per "
                         f"latent pixel x {patch} per token); pass --sample_size {fit}")
    return size // downscale


def sample_latents(velocity, cond: dict[str, Tensor], guidance: Tensor | None, cfg, channels: int, side: int,
                   device: torch.device) -> Tensor:
    """The sample images' latents (`side` latent pixels square, `sample_side`) on the SCFM grid, from the same
    noise every time (seeded by the run's seed), so that the images of successive steps compare."""
    from sampling.samplers import euler
    from sampling.schedules import ScheduleConfig, get_sigmas

    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(next(iter(cond.values())).shape[0], channels, side, side, generator=g).to(device)
    sigmas = get_sigmas(ScheduleConfig(grid="scfm", shift=cfg.sample_shift), cfg.sample_steps)
    return euler(velocity, noise, sigmas, cond, guidance).float()


def sample_paths(folder: Path, step: int, prompts: int, vae_path: str) -> list[Path]:
    """The files `save_samples` writes for `step`: one PNG per prompt with a VAE, else one safetensors."""
    if not vae_path:
        return [folder / f"step-{step:06d}.safetensors"]
    return [folder / f"step-{step:06d}_{i:02d}.png" for i in range(prompts)]


def save_samples(latents: Tensor, prompts: list[str], folder: Path, step: int, vae_path: str,
                 device: torch.device) -> list[Path]:
    """PNGs when a VAE is configured, else the latents as safetensors (no decoder, still inspectable)."""
    from weights.atomic import atomic_save

    if not vae_path:
        return [atomic_save({"latents": latents.cpu()}, sample_paths(folder, step, len(prompts), vae_path)[0],
                            {"prompts": json.dumps(prompts)}, overwrite=True)]
    from model.vae import vae_to_images
    from sampling.base import to_pil
    from sampling.png_record import save_png
    from weights.vae import load_vae

    vae = load_vae(vae_path, device=device)
    images = to_pil(vae_to_images(vae.decode(vae.denormalize_latents(latents.to(device)))))
    paths = sample_paths(folder, step, len(prompts), vae_path)
    for path, prompt, image in zip(paths, prompts, images, strict=True):
        save_png(image, path, {"prompt": prompt, "step": step})
    return paths


class SampleImages:
    """The sample images of a run, as a base of distill/trainer.py's Trainer (whose config, cache, model, device,
    rank, sharding and output folder they read): rendered on the SCFM grid with the live set every
    `sample_every` steps, and those of the step a resumed run was killed while sampling."""

    @torch.no_grad()
    def sample(self, step: int) -> list[Path]:
        from sampling.samplers import cfg_scale_from_w, sd3_cfg

        cfg = self.config
        prompts, cond = self.cache.sample_cond()  # __init__ refused a cache without sample prompts
        cond = {k: v.to(self.device) for k, v in cond.items()}
        channels = self.kind.latent_channels(self.model.config)
        velocity = self.kind.part("velocity")(self.model)
        guidance = None
        if self.kind.guidance == "embedding":
            guidance = torch.full((len(prompts),), cfg.sample_guidance, device=self.device)
        elif self.negative is not None:  # sampled as trained: c + w (c - u), diffusers' scale 1 + w
            velocity = sd3_cfg(velocity, self.uncond(len(prompts)), cfg_scale_from_w(cfg.scfm.cfg_scale))
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast)
        with weight_set(self.model, "live"), autocast:
            latents = sample_latents(velocity, cond, guidance, cfg, channels, self.sample_side, self.device)
        if self.rank != 0:
            return []
        return save_samples(latents, prompts, self.out / "samples", step, cfg.vae, self.device)

    def _samples_missing(self) -> bool:
        """Whether the checkpoint resumed from is at a sample step whose images were never (or only partly)
        written: a run killed while sampling wrote that step's checkpoint first, and its resume starts at the next
        step, so without this those images would never be made. Rank 0 looks; a sharded model's processes, which
        all sample, are told."""
        cfg, step = self.config, self.progress.step
        if not (cfg.sample_every and step and step % cfg.sample_every == 0) or not (self.rank == 0 or self.sharded):
            return False
        missing = torch.tensor(0.0, device=self.device)
        if self.rank == 0:
            paths = sample_paths(self.out / "samples", step, len(self.cache.plan["sample_prompts"]), cfg.vae)
            missing.fill_(float(not all(p.is_file() for p in paths)))
        if self.sharded and self.world > 1:
            dist.broadcast(missing, 0)
        return bool(missing.item())


def os_error_line(e: OSError, output: Path | None) -> str:
    """The one line for the disk's refusal (a full disk, a file where a folder goes, a read-only folder): what
    errno says, its fix, and what a rerun goes on from: the newest checkpoint when there is one."""
    where = f"{e.filename}: " if e.filename else ""
    found = checkpoints(output / "checkpoints") if output is not None else []
    if found:
        then = f"checkpoints: {found[-1]}, the newest, is intact: {disk_fix(e)}, then --resume"
    elif output is not None and (output / "log.jsonl").exists():  # --resume starts that run again from step 0
        then = f"checkpoints: none written yet: {disk_fix(e)}, then --resume (it starts again at step 0)"
    else:
        then = f"checkpoints: none written yet: {disk_fix(e)}, then run the same command again"
    return f"{where}{e.strerror or e}; {then}"


def base_lora_records(specs: tuple[str, ...]) -> list[dict]:
    """What an exported LoRA records of the LoRAs merged into its base (`--base_loras`): file name, scale and
    sha256, so that `generate` can tell when it is sampled without them."""
    from weights.io import file_sha256
    from weights.lora_merge import lora_spec

    return [{"file": Path(path).name, "scale": scale, "sha256": file_sha256(path)}
            for path, scale in map(lora_spec, specs)]


SCALARS = ("loss", "loss_mean", "grad_norm", "seconds_per_step")  # what TensorBoard and W&B plot


class LogError(ValueError):
    """A log.jsonl that cannot be continued (a damaged line before its last), as one line."""


def _log_rows(path: Path, resumed_step: int) -> list[str]:
    """The lines of `path` up to `resumed_step`. A last line that does not parse is what a run killed while
    writing it leaves: dropped, with one line on stderr. Any earlier one is damage we must not paper over."""
    if resumed_step == 0:  # a run starting over keeps no row: nothing to read
        return []
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            kept = bool(line) and json.loads(line)["step"] <= resumed_step
        except (ValueError, KeyError, TypeError):  # not JSON, not a row, a step that is not a number
            if i == len(lines) - 1:
                print(f"{path}: dropped its last line, cut short by a killed run ({line[:40]!r}...)", file=sys.stderr)
                break
            raise LogError(f"{path}: line {i + 1} of {len(lines)} is not a JSON log row ({line[:40]!r}); fix or "
                           f"delete that line (or move {path.name} aside), then --resume") from None
        if kept:
            keep.append(line)
    return keep


class JsonlLog:
    """Append-only JSONL; on resume, lines past the checkpoint (from the killed run) are dropped first. Also
    TensorBoard's event files when it is installed, and a Weights & Biases run when a project is given."""

    def __init__(self, path: Path, resumed_step: int, wandb_project: str = "", config: dict | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            keep = _log_rows(path, resumed_step)
            # a kill mid-rewrite leaves the old log whole; the temp's name is ours alone and it gets the user's umask
            with atomic_path(path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in keep))
        self.path = path
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the killed run's events from the first step this run logs again (rows
            # are 1-based), as log.jsonl drops those rows; a run starting over hides them all
            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resumed_step + 1)
        except ImportError:  # TensorBoard is optional
            self.tb = None
        self.wandb = _wandb_run(path.parent, wandb_project, config or {}) if wandb_project else None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        # a compiled run's first row may have no speed figures (its window held only the compiling step)
        if self.tb:
            for k in SCALARS:
                if k in row:
                    self.tb.add_scalar(k, row[k], row["step"])
        if self.wandb:
            self.wandb.log({k: row[k] for k in (*SCALARS, "lr", "images_per_second") if k in row}, step=row["step"])

    def samples(self, paths: list[Path], step: int) -> None:
        """Sample PNGs to W&B, captioned with the prompt each PNG carries (TensorBoard users open samples/)."""
        if self.wandb and paths and paths[0].suffix == ".png":
            import wandb

            from sampling.png_record import read_png_params

            prompts = [read_png_params(p)["prompt"] for p in paths]
            self.wandb.log({"samples": [wandb.Image(str(p), caption=c) for p, c in zip(paths, prompts)]}, step=step)

    def close(self, finished: bool) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:  # a run that stopped early shows as failed, and --resume continues it
            self.wandb.finish(exit_code=0 if finished else 1)


def _wandb_run(folder: Path, project: str, config: dict):
    """A W&B run whose id is kept in the output folder, so that --resume continues it. (W&B drops rows of steps
    it already has: those between the checkpoint and the kill stay as the killed run logged them.)"""
    import wandb  # DistillConfig checked that it is installed

    id_file = folder / "wandb-run-id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with atomic_path(id_file) as tmp:
            tmp.write_text(run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", name=folder.name, config=config,
                      dir=str(folder))


def out_of_memory(cfg, found: list, local_batch: int, n_blocks: int, step: int, device: torch.device) -> str:
    """The one line for an out-of-memory step: where the run stands (`found`: its checkpoints) and what lowers the
    peak (only the switches not already on, cheapest first; all of them can change on --resume)."""
    where = (f"the newest checkpoint ({found[-1]}) is intact, so add them to --resume" if found else
             "no checkpoint was written yet, so add them to the same command")
    micro = cfg.micro_batch or local_batch
    swap = cfg.blocks_to_swap + (n_blocks - cfg.blocks_to_swap) // 2  # about half of those still held
    tips = [tip for tip, useful in (
        (f"--unchecked_blocks {cfg.unchecked_blocks // 2} (fewer blocks that skip recomputation)",
         cfg.unchecked_blocks > 0),
        ("--fp8_base (the frozen blocks in fp8: Flux-dev 23.7 -> 11.9 GB)", not cfg.fp8_storage),
        ("--gradient_checkpointing", not cfg.gradient_checkpointing),
        (f"--micro_batch {micro // 2} (gradient accumulation: the same batch in halves)", micro % 2 == 0),
        (f"--blocks_to_swap {swap} (those blocks' weights wait in CPU memory: slower)",
         swap > cfg.blocks_to_swap and cfg.gradient_checkpointing and not cfg.fsdp),
    ) if useful]
    tips = tips or [f"a new run with --rank {max(1, cfg.lora.rank // 2)}"]
    used = (f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB at the peak)"
            if device.type == "cuda" else "")
    return f"out of GPU memory at step {step}{used}; {where}: {', '.join(tips)}"


class StopSignals:
    """While entered, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, torchrun passing one on) ask the run to
    stop at the end of a step, where it writes a checkpoint, instead of losing the steps since the last one; the
    trainer agrees the stop across processes. A second signal stops at once, as it would have without us, unless
    it follows the first within REPEAT seconds: torchrun passes the terminal's Ctrl-C on to workers that already
    got it, and that is still one request. Outside the main thread (where Python cannot handle signals) nothing
    is installed, nor for a signal already ignored: a shell without job control starts a background job (`&`)
    with SIGINT ignored so that the terminal's Ctrl-C reaches only the foreground one, and nohup-like launchers
    ignore what they mean the run not to see."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT = 2.0

    def __init__(self):
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) != signal.SIG_IGN}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self._at < self.REPEAT:  # the same request, delivered twice
                return
            self.__exit__()  # a second request: the previous handler, at once (KeyboardInterrupt, or exit)
            os.kill(os.getpid(), signum)
            return
        self.received, self._at = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again: stop now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
