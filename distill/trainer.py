"""The SCFM training loop: one global batch per step, checkpoints, resume, logging, samples, export.

The objective lives in `distill/scfm.py`, the student's preparation in `distill/student.py` and a resume's checks
in `distill/resume.py`; this file owns the run around them. Flux and SD3 / SD3.5 (the MMDiT) train the same way;
the family decides the velocity wrapper, the LoRA targets and, for SD3.5 with `cfg_scale`, the classifier-free
guidance baked into every call (docs/method.md §5) against the cache's negative (empty) prompt. Each step's data
and random draws are pure functions of (seed, step, global element position) (`BucketBatches`,
`element_generators`), so a resumed run and a run on any number of processes train on exactly the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.layers import named_blocks

from . import speed
from .checkpoint import (
    CheckpointError,
    check_finite,
    checkpoints,
    clean_temp,
    latest_checkpoint,
    lora_files,
    model_record,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import AUTO, DistillConfig, lr_at
from .data import BucketBatches, Cache, weights_identity
from .ema import ema_step
from .lora import lora_layers, set_state_dict
from .resume import apply_optimizer_config, check_resumable, load_training_state
from .run_outputs import (
    JsonlLog,
    LogError,
    SampleImages,
    StopSignals,
    base_lora_records,
    out_of_memory,
    sample_side,
)
from .run_setup import with_text_length
from .scfm import element_generators, sample_draw, scfm_loss
from .sharding import StudentRoute, full, is_sharded
from .student import StudentError, family_refusal, model_family, prepare_student


class TrainingError(RuntimeError):
    """The run cannot go on (repeated NaN/inf, a mismatched resume), as one line."""


class Stopped(TrainingError):
    """SIGINT / SIGTERM stopped the run at the end of a step, after writing a checkpoint there."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class Progress:
    step: int = 0  # batches consumed (skipped ones included): the next step trains on batch `step`
    updates: int = 0  # optimiser steps taken (EMA restarts count these)
    bad_in_row: int = 0


class Trainer(SampleImages):
    def __init__(self, config: DistillConfig, model: nn.Module, cache: Cache, *,
                 device: torch.device | str = "cpu", on_step: Callable[[int], None] | None = None):
        self.config, self.cache, self.device = config, cache, torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if config.batch_size % self.world:
            raise TrainingError(f"batch_size {config.batch_size} does not split over {self.world} processes")
        self.local_batch = config.batch_size // self.world
        if config.micro_batch and self.local_batch % config.micro_batch:
            raise TrainingError(f"micro_batch {config.micro_batch} does not divide the per-process batch "
                                f"{self.local_batch}")
        self.on_step = on_step  # called after every step (tests use it to kill a run)
        self.signals = StopSignals()
        self.out = Path(config.output).expanduser()
        try:
            self.kind = model_family(model)
        except StudentError as e:
            raise TrainingError(str(e)) from None
        self.config = config = with_text_length(config, self.kind, warn=False)  # run() has resolved it already
        self.family = self.kind.name
        self.token_side = self.kind.token_side(model.config)  # latent pixels per token side: Flux 2, FLUX.2 1
        refused = family_refusal(config, self.kind, lambda: getattr(model.config, "guidance_embed", False))
        if refused:  # train.py said it before the cache was built; a Python caller hears it here
            raise TrainingError(refused)
        self.negative = None
        if config.scfm.cfg_scale:
            self.negative = cache.negative_cond()  # {name: (1, ...)}: the empty prompt, embedded once
            if self.negative is None:
                raise TrainingError(f"{cache.folder}: the cache has no negative prompt, which cfg_scale "
                                    "needs; build a cache for SD3.5 (it embeds the empty prompt once)")
        if config.sample_every:  # refused now, not at the first sample steps into the run
            if cache.sample_cond() is None:
                raise TrainingError(f"sample_every {config.sample_every}: the cache {cache.folder} holds no sample "
                                    "prompts; pass --sample_prompts (with the encoders, to embed them) or "
                                    "--sample_every 0")
            try:
                self.sample_side = sample_side(config.sample_size, cache.downscale, self.token_side)
            except ValueError as e:
                raise TrainingError(str(e)) from None

        self.sharded = is_sharded(config.fsdp)
        if config.fsdp and self.world == 1:
            warnings.warn("--fsdp shards over the processes torchrun starts; with one process nothing is sharded",
                          stacklevel=2)
        try:
            model, self.names = prepare_student(model, config, self.kind, self.device, self.world)
        except StudentError as e:
            raise TrainingError(str(e)) from None
        self.checked = False  # the first step plans unchecked blocks (auto) and checks compiled gradients
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.params], lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
            weight_decay=config.weight_decay,
        )
        student, self.ddp = model, None
        if self.world > 1 and not self.sharded:
            # every rank built the same seeded LoRA; broadcasting the 12 B frozen base (init_sync) is waste
            for _, p in self.params:
                dist.broadcast(p.data, 0)
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False, init_sync=False)
            student = StudentRoute(self.ddp)
        self.velocity = self.kind.part("velocity")(student)
        self.scfm = config.scfm.scfm_config(getattr(model.config, "guidance_embed", False), self.kind.dynamic_shift)
        self.ema = config.ema.ema_config()
        self.batches = BucketBatches(cache.buckets, config.batch_size, config.seed, cache.repeats)
        self.progress = Progress()
        self.checkpointed = -1  # the step of the checkpoint this run wrote or resumed from last
        self.autocast = config.autocast and self.device.type == "cuda"

    # --- one step -----------------------------------------------------------------------------------------

    def _micro_loss(self, step: int, indices: list[int], positions: range) -> Tensor:
        """Backward of one micro-batch's share of the local loss; returns its detached loss sum."""
        out = self._loss(step, indices, positions)
        (out.loss * (len(positions) / self.local_batch)).backward()
        return out.loss.detach().float() * len(positions)

    def _loss(self, step: int, indices: list[int], positions: range):
        cfg = self.config
        x0, cond = self.cache.load([indices[p] for p in positions])
        x0 = x0.to(self.device, torch.float32)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        uncond = None if self.negative is None else self.uncond(len(positions))
        h, w = x0.shape[-2:]
        tokens = (h // self.token_side) * (w // self.token_side)  # the image tokens the dynamic shift depends on
        draw = sample_draw(self.scfm, element_generators(cfg.seed, step, positions), x0.shape[1:], tokens,
                           positions=positions, global_batch=cfg.batch_size)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return scfm_loss(self.velocity, self.model, x0, cond, draw, self.scfm, uncond=uncond)

    def uncond(self, batch: int) -> dict[str, Tensor]:
        """The negative prompt's conditioning for `batch` elements (a view, no copy)."""
        return {k: v.to(self.device).expand(batch, *v.shape[1:]) for k, v in self.negative.items()}

    def step(self) -> dict:
        cfg, step = self.config, self.progress.step
        indices = self.batches.batch(step)
        first = self.rank * self.local_batch
        micro = cfg.micro_batch or self.local_batch
        if not self.checked and cfg.unchecked_blocks == AUTO:
            try:
                speed.plan_on_first_batch(self, step, indices, range(first, first + micro))
            except speed.SpeedError as e:
                raise TrainingError(str(e)) from None
        loss_sum = torch.zeros((), device=self.device)
        for start in range(first, first + self.local_batch, micro):
            last = start + micro == first + self.local_batch
            # DDP and FSDP reduce gradients in the last micro-batch's backward only
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                loss_sum += self._micro_loss(step, indices, range(start, start + micro))
        if not self.checked:
            self.checked = True
            if cfg.compile:
                try:
                    speed.check_block_gradients(self.model)
                except speed.SpeedError as e:
                    raise TrainingError(str(e)) from None
        params = [p for _, p in self.params]
        norm = full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
        # one reduction carries the loss sum (for the log), any rank's NaN, so every rank skips together, and any
        # rank's stop signal (as its number: the largest wins), so every rank stops after the same step
        stop = torch.tensor(float(self.signals.received or 0), device=loss_sum.device)
        stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(), stop])
        if self.world > 1:
            dist.all_reduce(stats[:2])
            dist.all_reduce(stats[2:], op=dist.ReduceOp.MAX)
        loss = stats[0].item() / cfg.batch_size
        bad = stats[1].item() > 0 or not math.isfinite(norm.item())
        self.progress.step += 1  # the batch is consumed either way: a skipped one is not retried
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.bad_in_row += 1
            warnings.warn(f"step {step + 1}: loss {loss} / grad norm {norm.item()} is not finite; "
                          "step skipped", stacklevel=2)
            if self.progress.bad_in_row >= cfg.max_bad_steps:
                raise TrainingError(f"{self.progress.bad_in_row} steps in a row had a NaN/inf loss or "
                                    f"gradient (last at step {step + 1}); lower lr or check the data, "
                                    "then --resume")
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.updates += 1
            self.progress.bad_in_row = 0
            if cfg.scfm.objective == "scfm":  # flow matching holds no EMA sets
                ema_step(self.model, self.ema, self.progress.updates)
        return {"step": step + 1, "loss": loss, "grad_norm": norm.item(), "skipped": bad,
                "bucket": list(self.cache.buckets[indices[0]]), "stop": int(stats[2].item())}

    # --- the loop -----------------------------------------------------------------------------------------

    def run(self) -> None:
        from tqdm import tqdm

        cfg = self.config
        resumed = False
        if cfg.resume:
            resumed = self.resume()
        elif checkpoints(self.out / "checkpoints"):
            raise TrainingError(f"{self.out} already holds checkpoints; pass --resume to continue that run "
                                "or choose another --output")
        try:
            log = JsonlLog(self.out / "log.jsonl", self.progress.step, cfg.wandb_project,
                           cfg.to_dict()) if self.rank == 0 else None
        except LogError as e:
            raise TrainingError(str(e)) from None
        if resumed and self._samples_missing():
            paths = self.sample(self.progress.step)
            if log:
                log.samples(paths, self.progress.step)
        bar = tqdm(total=cfg.steps, initial=self.progress.step, desc="scfm", unit="step",
                   disable=self.rank != 0)
        try:
            with self.signals:
                self._loop(log, bar)
        finally:
            bar.close()
            if log:
                log.close(finished=self.progress.step == cfg.steps)
        if self.checkpointed != self.progress.step:  # the last step's (a folder of that name may be a damaged one)
            self.save()

    def _loop(self, log: JsonlLog | None, bar) -> None:
        cfg = self.config
        window, timed, t0 = [], 0, time.perf_counter()
        warm_up = cfg.compile  # the first step compiles the blocks: said, and kept out of the speed figures
        while self.progress.step < cfg.steps:
            try:
                metrics = self.step()
            except torch.OutOfMemoryError:
                raise TrainingError(self.out_of_memory()) from None
            step = metrics["step"]
            window.append(metrics["loss"])
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            bar.update(1)
            if warm_up:
                warm_up, seconds, t0 = False, time.perf_counter() - t0, time.perf_counter()
                metrics["compile_seconds"] = round(seconds, 2)
                if self.rank == 0:
                    bar.write(f"--compile: the first step took {seconds:.1f} s, compiling the blocks included "
                              "(later steps: seconds_per_step in log.jsonl)")
            else:
                timed += 1
            if log and (step % cfg.log_every == 0 or step == cfg.steps):
                dt = time.perf_counter() - t0
                speed = {"seconds_per_step": dt / timed, "images_per_second": timed * cfg.batch_size / dt} \
                    if timed else {}
                log.write({**metrics, "loss_mean": sum(window) / len(window),
                           "lr": self.optimizer.param_groups[0]["lr"], **speed})  # lr: what the step used
                window, timed, t0 = [], 0, time.perf_counter()
            saved = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps
            if saved:
                self.save()
            if cfg.sample_every and step % cfg.sample_every == 0 and (self.rank == 0 or self.sharded):
                paths = self.sample(step)  # a sharded model samples on every process (each holds a shard)
                if log:
                    log.samples(paths, step)
            if self.on_step:
                self.on_step(step)
            if metrics["stop"] and step < cfg.steps:  # every process, at the same step (agreed in `step`)
                if not saved:
                    self.save()
                raise Stopped(f"{signal.Signals(metrics['stop']).name} at step {step}: checkpoint "
                              f"{self.out / 'checkpoints' / f'step-{step:06d}'} written; --resume continues",
                              metrics["stop"])

    def out_of_memory(self) -> str:
        return out_of_memory(self.config, checkpoints(self.out / "checkpoints"), self.local_batch,
                             len(named_blocks(self.model)), self.progress.step + 1, self.device)

    # --- checkpoints --------------------------------------------------------------------------------------

    def _sets(self) -> list[str]:
        layer = next(iter(lora_layers(self.model).values()))
        return list(layer.set_names())

    @functools.cached_property
    def base_loras(self) -> list[dict]:
        """Name, scale and sha256 of each LoRA merged into the base, hashed once (exports record them)."""
        return base_lora_records(self.config.lora.base_loras)

    @functools.cached_property
    def weights(self) -> str | None:
        """The model's weights' fingerprint, taken once (checkpoints record it, resumes compare it)."""
        return weights_identity(self.config.model)

    @functools.cached_property
    def teacher_files(self) -> dict:
        """The files the teacher is made of, by content, as checkpoints record and resumes compare them."""
        return lora_files(self.base_loras, self.config.lora.teacher_lora)

    def save(self) -> Path | None:
        """Rank 0 writes; the others wait, so nobody runs ahead of a checkpoint that may yet fail."""
        path = None
        # every process: sharded sets and moments are gathered together (plain ones are views, no copy)
        tensors = {f"lora.{s}.{k}": v for s in self._sets() for k, v in set_state_dict(self.model, s).items()}
        opt_tensors, opt_state = optimizer_state(self.optimizer, [n for n, _ in self.params])
        if self.world > 1:  # rank 0 checks as it writes; the others check too, so that every process stops
            try:
                check_finite(self.out / "checkpoints", self.progress.step, {**tensors, **opt_tensors})
            except CheckpointError as e:
                raise TrainingError(str(e)) from None
        if self.rank == 0:
            rng_tensors, rng_json = rng_state()
            position = self.batches.position(self.progress.step)
            # the model's config and base LoRAs: a checkpoint exports alone (distill/lora_export.py)
            state = {"progress": vars(self.progress), "data_position": position,
                     "cache": self.cache.fingerprint(), "config": self.config.to_dict(),
                     "model": model_record(self.family, self.model.config, self.weights),
                     **self.teacher_files,
                     "world_size": self.world, "optimizer": opt_state, "rng": rng_json}
            try:
                path = save_checkpoint(self.out / "checkpoints", self.progress.step,
                                       {**tensors, **opt_tensors, **rng_tensors}, state,
                                       self.config.keep_checkpoints)
            except CheckpointError as e:  # NaN/inf weights, a full disk: the newest checkpoint stays
                raise TrainingError(str(e)) from None
        if self.world > 1:
            dist.barrier()
        self.checkpointed = self.progress.step
        return path

    def resume(self) -> bool:
        root = self.out / "checkpoints"
        if self.rank == 0:
            clean_temp(root)
        try:
            found = latest_checkpoint(root)
        except CheckpointError as e:  # starting over would overwrite them: the user decides that
            raise TrainingError(f"{e}; --resume has nothing to continue from: to start over, pass a new --output "
                                f"or delete {root}") from None
        if found is None:
            warnings.warn(f"--resume: no checkpoint in {root}; starting from step 0", stacklevel=2)
            return False
        path, tensors, state = found
        try:
            before_repeats = check_resumable(path, state, self.config, self.teacher_files,
                                             model_record(self.family, self.model.config, self.weights), self.cache)
            load_training_state(path, self.model, self._sets(), self.optimizer, [n for n, _ in self.params],
                                tensors, state)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        if before_repeats:  # that run drew its batches without kohya's repeat counts: it goes on doing so
            self.batches = BucketBatches(self.cache.buckets, self.config.batch_size, self.config.seed)
        apply_optimizer_config(self.optimizer, self.config, max(state["progress"]["step"] - 1, 0))
        set_rng_state(tensors, state["rng"])
        # the NaN stop's advice is "lower lr, then --resume": the resumed run gets its own max_bad_steps
        self.progress = Progress(**{**state["progress"], "bad_in_row": 0})
        self.checkpointed = self.progress.step
        return True
