"""The training loop: an ai-toolkit FLUX job (LoRA or full fine-tune) with COAT FP8 savings, start to finish.

Read :func:`train` top to bottom; each phase is one short helper below it:

1. **Check before loading.** The config was validated by ``load_config``; here the dataset folders
   are scanned and the output folder is checked (resume from the newest usable checkpoint, or
   refuse to overwrite a finished run) before a single weight is read, because loading FLUX takes
   minutes.
2. **Load and cache.** All components load on the CPU in ``train.dtype``. The micro-batches of
   the whole run are planned up front (they are a pure function of (seed, epoch), see
   :mod:`coatflux.trainer.data`), so every caption and image the run will use is known: with
   caching on, each is encoded exactly once (:mod:`coatflux.trainer.encoding`), then the text
   encoders (and the VAE, unless sampling needs it) are freed for the training phase.
3. **Prepare the transformer.** :func:`~coatflux.trainer.network.build_network` freezes it, makes
   the trained part trainable (LoRA adapters or selected weights), converts it to FP8 as
   configured and moves it to the device; with several processes it is wrapped for DDP
   (:mod:`coatflux.trainer.distributed`).
4. **Train.** The memory table is measured on the first batch (:mod:`coatflux.trainer.measure`).
   Rectified-flow loss (:mod:`coatflux.trainer.objective`), ``gradient_accumulation``
   micro-batches per optimizer step on each process, gradient clipping, LR schedule, optional EMA;
   a tqdm bar, optional TensorBoard, the guide's memory lines; weight files, checkpoints and
   samples on their periods. What goes wrong is handled between steps
   (:mod:`coatflux.trainer.faults`): SIGINT/SIGTERM save and stop, a non-finite step is skipped
   and diagnosed, running out of memory saves and explains.

Determinism is designed in, not hoped for: each micro-batch draws its noise and timesteps from a
CPU generator seeded by ``(training_seed, its global index)``, latent sampling from a generator
seeded by each image's cache key, and sampling from per-sample generators. With the checkpoint
restoring the optimizer, schedule, EMA, raw trained tensors and data position, a run stopped at
any step and resumed ends with the same weights, bit for bit, as an uninterrupted one (on CPU;
CUDA kernels may differ in the last bit between runs), and N processes see the micro-batches
one process would see with N times the accumulation.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coatflux.core.accounting import optimizer_state_bytes
from coatflux.flux.attention import attention_policy, keep_attention_grads_contiguous
from coatflux.flux.loading import load_flux_components
from coatflux.flux.lora import lora_metadata
from coatflux.trainer.checkpoint import (
    CHECKPOINT_VERSION,
    RunPaths,
    capture_rng,
    newest_checkpoint,
    prepare_output_dir,
    prune_step_loras,
    restore_rng,
    save_checkpoint,
    write_config,
)
from coatflux.trainer.config import TrainJobConfig
from coatflux.trainer.data import Item, TrainingData
from coatflux.trainer.distributed import Runtime, make_runtime
from coatflux.trainer.encoding import BatchEncoder, fill_caches
from coatflux.trainer.faults import (
    NonFiniteError,
    NonFiniteGuard,
    StopSignals,
    TrainingOutOfMemory,
    first_nonfinite_output,
    gradient_norm,
    nonfinite_gradients,
    out_of_memory_advice,
    signal_name,
)
from coatflux.trainer.measure import block_copies, measure_memory
from coatflux.trainer.network import TrainedNetwork, build_network, compiles_with_cudagraphs
from coatflux.trainer.objective import flow_matching_loss, noise_generator
from coatflux.trainer.optimizers import LoRAEMA, build_lr_scheduler, build_optimizer
from coatflux.trainer.report import MemoryTable, format_table, memory_line
from coatflux.trainer.sampling import Sampler, encode_prompts, sample_prompts

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced. ``stopped_by`` names the signal when SIGINT/SIGTERM ended it early."""

    lora_path: Path
    output_dir: Path
    samples: list[Path]
    steps: int
    losses: list[float]
    resumed_from: int | None = None
    memory: MemoryTable | None = None
    stopped_by: str | None = None
    skipped_steps: int = 0
    checkpoint: Path | None = None
    rank: int = 0


@dataclass
class _State:
    """Everything the loop mutates, in one place (and what the checkpoint saves).

    ``epoch``/``batch_index`` is the position of the next global micro-batch in the data plan and
    ``micro_batches`` how many the run has consumed; both are the same on every process.
    """

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    micro_batches: int = 0
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None

    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.batch_index, self.micro_batches

    def rewind(self, position: tuple[int, int, int]) -> None:
        self.epoch, self.batch_index, self.micro_batches = position


@dataclass
class _Run:
    """The objects one run trains with, built once in :func:`train`."""

    cfg: TrainJobConfig
    runtime: Runtime
    paths: RunPaths
    transformer: nn.Module  # the model itself: attributes, hooks, saving, sampling
    model: nn.Module  # what the loss calls: the transformer, or its DDP wrapper
    network: TrainedNetwork
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: LoRAEMA | None
    guard: NonFiniteGuard

    @property
    def device(self) -> torch.device:
        return self.runtime.device


def train(cfg: TrainJobConfig, *, overwrite: bool = False, device: str | torch.device | None = None) -> TrainResult:
    """Train what ``cfg`` describes; resumes from the newest usable checkpoint when there is one."""
    with attention_policy(allow_cudnn=cfg.model.cudnn_attention):
        return _train(cfg, overwrite, device)


def _train(cfg: TrainJobConfig, overwrite: bool, device: str | torch.device | None) -> TrainResult:
    runtime = make_runtime(_pick_device(device or cfg.device))
    paths = RunPaths(cfg.output_dir, cfg.name)
    # 1. Check everything that can fail before loading the model.
    data = TrainingData(cfg.datasets, cfg.train.batch_size)
    checkpoint = _prepare_output(paths, cfg, overwrite, runtime)
    state = _initial_state(cfg, checkpoint)
    # 2. Load, plan the run's micro-batches, fill the caches, free what training does not need.
    dtype = getattr(torch, cfg.train.dtype)
    components = load_flux_components(cfg.model.name_or_path, dtype, "cpu")
    caches = BatchEncoder(cfg, components, runtime.device, dtype)
    plan = _plan(data, cfg, state, runtime.world_size)
    fill_caches(caches, plan, runtime)
    sampler = _make_sampler(cfg, components, paths, runtime.device, dtype) if runtime.is_main else None
    caches.release_encoders(keep_vae=sampler is not None or not caches.all_latents_cached)
    # 3. Select what trains, convert to FP8, move to the device; optimizer, schedule, EMA.
    transformer = components.transformer
    if cfg.model.cudnn_attention:
        keep_attention_grads_contiguous(transformer)  # before any block is compiled; see flux.attention
    copies = block_copies(transformer) if runtime.is_main else {}
    network = build_network(transformer, cfg, runtime.device, state.seed)
    params = network.parameters()
    optimizer = build_optimizer(params, cfg.train, cfg.coat)
    ema = LoRAEMA(params, cfg.train.ema_config.ema_decay) if cfg.train.ema_config.use_ema else None
    run = _Run(cfg, runtime, paths, transformer, transformer, network, optimizer,
               build_lr_scheduler(optimizer, cfg.train), ema, NonFiniteGuard(cfg.train.max_nonfinite_steps))
    if checkpoint is not None:
        _restore(run, checkpoint)
        _say(runtime, f"Resuming {cfg.name} from {_checkpoint_name(paths, checkpoint)} at step {state.step} "
                      f"(epoch {state.epoch}, batch {state.batch_index}) of {cfg.train.steps}")
    run.model = runtime.wrap(transformer)
    # 4. Train.
    table = (measure_memory(cfg, transformer, params, copies, caches, plan[0], runtime.device)
             if runtime.is_main else None)
    del copies, plan
    if sampler is not None and checkpoint is None and not cfg.train.skip_first_sample:
        state.samples += _sample(sampler, ema, 0)
    stopped = _Loop(run, caches, table).run(state, _batch_stream(data, state), sampler)
    resumed = None if checkpoint is None else int(checkpoint["step"])
    if stopped is not None:
        return TrainResult(paths.output_dir, paths.output_dir, state.samples, state.step, state.losses, resumed,
                           table, stopped, run.guard.total, state.checkpoint, runtime.rank)
    final = _save_final(run, state)
    if sampler is not None:
        state.samples += _sample(sampler, ema, state.step)
    return TrainResult(final, paths.output_dir, state.samples, state.step, state.losses, resumed, table,
                       None, run.guard.total, state.checkpoint, runtime.rank)


def _say(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        tqdm.write(message)


# ----------------------------------------------------------------------------------------------
# Phase 1: device, output folder, seed and resume position.


def _pick_device(name: str | torch.device) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {name!r} requested but CUDA is not available; training on the CPU",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    return device


def fingerprint(cfg: TrainJobConfig) -> dict[str, str]:
    """The settings a checkpoint's tensors and data position depend on (see :mod:`.checkpoint`)."""
    net, train = cfg.network, cfg.train
    values: dict[str, Any] = {
        "model.name_or_path": cfg.model.name_or_path, "network.type": net.type,
        "network.network_kwargs": [list(net.network_kwargs.only_if_contains),
                                   list(net.network_kwargs.ignore_if_contains)],
        "train.optimizer": train.optimizer, "train.batch_size": train.batch_size,
        "train.gradient_accumulation": train.gradient_accumulation, "train.dtype": train.dtype,
        "train.ema_config.use_ema": train.ema_config.use_ema,
    }
    if net.type == "lora":
        values.update({"network.linear": net.linear, "network.linear_alpha": net.alpha})
    if train.optimizer == "coat_fp8_adamw":
        values["coat.optimizer"] = repr(cfg.coat.optimizer)
    return {key: json.dumps(value) for key, value in values.items()}


def _prepare_output(paths: RunPaths, cfg: TrainJobConfig, overwrite: bool, runtime: Runtime) -> dict[str, Any] | None:
    """The checkpoint to resume from; only the main process deletes or writes anything."""
    if runtime.is_main:
        checkpoint = prepare_output_dir(paths, cfg.train.steps, overwrite, fingerprint(cfg))
        write_config(paths, cfg.raw)
    runtime.barrier()
    if not runtime.is_main:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the main process has reported each skipped checkpoint
            checkpoint = None if overwrite else newest_checkpoint(paths, fingerprint(cfg))
    return checkpoint


def _checkpoint_name(paths: RunPaths, checkpoint: dict[str, Any]) -> str:
    return str(paths.checkpoint(int(checkpoint["step"])))


def _initial_state(cfg: TrainJobConfig, checkpoint: dict[str, Any] | None) -> _State:
    if checkpoint is not None:
        return _State(step=int(checkpoint["step"]), epoch=int(checkpoint["epoch"]),
                      batch_index=int(checkpoint["batch_index"]), micro_batches=int(checkpoint["micro_batches"]),
                      seed=int(checkpoint["seed"]))
    # No training_seed: draw one, and record it in the checkpoint so a resume stays consistent.
    seed = cfg.training_seed if cfg.training_seed is not None else random.SystemRandom().randrange(2**31)
    return _State(seed=seed)


def _batch_stream(data: TrainingData, state: _State) -> Iterator[tuple[int, int, list[Item]]]:
    """Global ``(epoch, index, batch)`` micro-batches forever, from the state's data position."""
    epoch, index = state.epoch, state.batch_index
    while True:
        batches = data.epoch_batches(epoch, state.seed)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


def _plan(data: TrainingData, cfg: TrainJobConfig, state: _State, world_size: int) -> list[list[Item]]:
    """Every global micro-batch the rest of the run will use (so caches can be filled once)."""
    count = (cfg.train.steps - state.step) * cfg.train.gradient_accumulation * world_size
    return [batch for _, _, batch in itertools.islice(_batch_stream(data, state), max(count, world_size))]


# ----------------------------------------------------------------------------------------------
# Phase 2: sampling.


def _make_sampler(cfg: TrainJobConfig, components, paths: RunPaths, device: torch.device,
                  dtype: torch.dtype) -> Sampler | None:
    items = cfg.sample.samples
    if cfg.train.disable_sampling or not items:
        return None
    trigger = cfg.trigger_word or next((d.trigger_word for d in cfg.datasets if d.trigger_word), None)
    embeddings = encode_prompts(components, sample_prompts(items, trigger), device, dtype)
    return Sampler(components, items, embeddings, paths.samples, cfg.sample.format, device,
                   cudagraphs=compiles_with_cudagraphs(cfg))


# ----------------------------------------------------------------------------------------------
# Phase 3: restoring a checkpoint.


def _restore(run: _Run, checkpoint: dict[str, Any]) -> None:
    run.network.load_raw_state(checkpoint["weights"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    # The schedule is a function of train.steps, which a resume usually raises: recompute the
    # current lr from this run's schedule instead of keeping the one the old schedule left.
    scheduler = run.scheduler
    for group, base, factor in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    if run.ema is not None:
        run.ema.load_state_dict(checkpoint["ema"])
    run.guard.load_state_dict(checkpoint["nonfinite"])
    restore_rng(checkpoint["rng"])


# ----------------------------------------------------------------------------------------------
# Phase 4: the step loop.


def zero_gradients(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], keep_buffers: bool) -> None:
    """Clear the gradients before a step: dropped (the usual, cheapest), or, with ``keep_buffers``,
    zeroed in place in buffers allocated here once, outside any CUDA graph, so that backward adds
    into them instead of handing over memory that a graph replay would overwrite."""
    if not keep_buffers:
        optimizer.zero_grad(set_to_none=True)
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        else:
            param.grad.zero_()


def _to_host(*scalars: torch.Tensor) -> list[float]:
    """Scalar tensors as floats, in one read: each read waits for the GPU to drain its queue, and
    the GPU then idles until the host has launched what follows (a step used to read twice)."""
    device = scalars[0].device
    return torch.stack([t.float().to(device) for t in scalars]).tolist()


class _Loop:
    """One optimizer step at a time, with logging, saving, sampling and fault handling."""

    def __init__(self, run: _Run, caches: BatchEncoder, table: MemoryTable | None) -> None:
        self.run_, self.cfg, self.caches, self.table = run, run.cfg, caches, table
        self.params = run.network.parameters()
        every = run.cfg.coat.performance_log_every
        self.log_every = every if every is not None else run.cfg.performance_log_every
        self.writer = _tensorboard(run.cfg) if run.runtime.is_main else None
        self.seed, self.in_optimizer_step = 0, False
        self.monitor = _range_monitor(run.transformer)
        self.samples_per_step = run.cfg.train.batch_size * run.cfg.train.gradient_accumulation * run.runtime.world_size
        self.cudagraphs = compiles_with_cudagraphs(run.cfg)
        if self.cudagraphs and run.runtime.world_size > 1:
            raise ValueError(f"model.compile_mode: {run.cfg.model.compile_mode!r} replays the compiled blocks as "
                             f"CUDA graphs, which this trainer runs on one GPU only ({run.runtime.world_size} "
                             "processes here); use compile_mode: default with several GPUs")
        # Under CUDA graphs a gradient the compiled backward allocates lives in the graphs' memory,
        # which the next micro-batch's replay overwrites: accumulation needs .grad buffers of its own.
        self.stable_grads = self.cudagraphs and run.cfg.train.gradient_accumulation > 1

    def run(self, state: _State, stream: Iterator, sampler: Sampler | None) -> str | None:
        """Train to ``train.steps``; returns the signal's name if SIGINT/SIGTERM stopped it first."""
        total, runtime = self.cfg.train.steps, self.run_.runtime
        self.seed = state.seed
        if runtime.world_size > 1:
            _say(runtime, f"{runtime.world_size} processes, global batch {self.samples_per_step} "
                          f"(batch {self.cfg.train.batch_size} x accumulation {self.cfg.train.gradient_accumulation} "
                          f"x {runtime.world_size})")
        compiled = self.cfg.model.compile or self.cfg.coat.activation.compile_blocks
        if compiled and state.step < total:
            _say(runtime, "The first step compiles the transformer blocks (torch.compile): minutes on a GPU. "
                          "Later steps reuse the graphs (a batch size that first leaves 1 compiles once more).")
        bar = tqdm(total=total, initial=state.step, desc=self.cfg.name, unit="step", disable=not runtime.is_main)
        try:
            with StopSignals() as signals:
                while state.step < total:
                    started = time.perf_counter()
                    loss = self._guarded_step(state, stream)
                    state.step += 1
                    state.losses.append(loss)
                    seconds = time.perf_counter() - started
                    if compiled and len(state.losses) == 1:
                        _say(runtime, f"First step: {seconds:.1f} s, compilation included")
                    self._log(state, loss, seconds, bar)
                    self._periodic(state, sampler)
                    if runtime.any(signals.received is not None) and state.step < total:
                        return self._stop(state, signals.received)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
            if self.monitor is not None:
                self.monitor.close()
        return None

    def _stop(self, state: _State, signum: int | None) -> str:
        _save_step(self.run_, state)
        name = signal_name(signum) if signum is not None else "a stop signal on another process"
        _say(self.run_.runtime, f"Stopped by {name} after step {state.step} of {self.cfg.train.steps}. "
                                f"Checkpoint: {state.checkpoint}. Run the same command again to resume.")
        return name

    def _guarded_step(self, state: _State, stream: Iterator) -> float:
        position = state.position()
        try:
            return self.step(state, stream)
        except torch.OutOfMemoryError as error:
            raise self._out_of_memory(state, position, error) from error

    def _out_of_memory(self, state: _State, position: tuple[int, int, int],
                       error: Exception) -> TrainingOutOfMemory:
        """Free the step, save the state before it (if the optimizer had not started), explain."""
        run = self.run_
        run.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        state.rewind(position)
        saved = "nothing saved: the optimizer step was under way, so the weights may be half updated"
        if not self.in_optimizer_step and state.step > 0 and run.runtime.is_main:
            _save_step(run, state)
            saved = f"checkpoint of step {state.step}: {state.checkpoint}"
        lines = [f"Out of memory at step {state.step + 1} on {run.device} ({str(error).splitlines()[0]})",
                 memory_line("out_of_memory", state.step + 1, run.device), saved]
        if self.table is not None:
            lines.append(format_table(self.table))
        lines.append("To fit, try (most memory saved first):")
        lines += [f"  - {tip}" for tip in out_of_memory_advice(self.cfg)]
        return TrainingOutOfMemory("\n".join(lines))

    def _report(self, stage: str, step: int) -> None:
        if self.log_every and step % self.log_every == 0 and self.run_.runtime.is_main:
            tqdm.write(memory_line(stage, step, self.run_.device))

    def _micro_batches(self, state: _State, stream: Iterator) -> list[tuple[int, list[Item]]]:
        """This process's ``(global index, batch)`` pairs of the next step; advances the position."""
        runtime, count = self.run_.runtime, self.cfg.train.gradient_accumulation * self.run_.runtime.world_size
        drawn = []
        for _ in range(count):
            epoch, index, batch = next(stream)
            drawn.append((state.micro_batches, batch))
            state.epoch, state.batch_index, state.micro_batches = epoch, index + 1, state.micro_batches + 1
        return drawn[runtime.rank::runtime.world_size]

    def _loss(self, index: int, batch: list[Item], model: nn.Module | None) -> torch.Tensor:
        run = self.run_
        return flow_matching_loss(run.transformer, self.caches.latents(batch), self.caches.text_embeddings(batch),
                                  self.cfg, noise_generator(self.seed, index), run.device, model)

    def step(self, state: _State, stream: Iterator) -> float:
        """Forward and backward over this step's micro-batches, then the optimizer (or a skip)."""
        run, number, accumulation = self.run_, state.step + 1, self.cfg.train.gradient_accumulation
        self.in_optimizer_step = False
        zero_gradients(run.optimizer, self.params, keep_buffers=self.stable_grads)
        micro = self._micro_batches(state, stream)
        losses = []
        for j, (index, batch) in enumerate(micro):
            if j == 0:
                self._report("before_forward", number)
            if self.cudagraphs:  # a new model invocation: the graphs may reuse the last one's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with run.runtime.no_sync(run.model, skip=j < accumulation - 1):
                loss = self._loss(index, batch, run.model)
                if j == accumulation - 1:
                    self._report("after_forward", number)
                (loss / accumulation).backward()
            losses.append(loss.detach())
        self._report("after_backward", number)
        norm = gradient_norm(self.params)  # gradients are already averaged over processes
        local_loss, norm_value = _to_host(torch.stack(losses).mean(), norm)
        loss_value = run.runtime.mean(local_loss)
        self._apply_or_skip(state, number, loss_value, norm, norm_value, losses, micro)
        self._report("after_optimizer_step", number)
        if self.monitor is not None:
            from coatflux.core.stats import format_counts

            logger.debug("step %d: %s", number, format_counts(self.monitor.snapshot()))
            self.monitor.reset()
        if self.table is not None and self.table.optimizer_state is None and run.guard.in_a_row == 0:
            self.table.optimizer_state = optimizer_state_bytes(run.optimizer)
            tqdm.write(format_table(self.table))
        return loss_value

    def _apply_or_skip(self, state: _State, number: int, loss: float, norm: torch.Tensor, norm_value: float,
                       losses: list[torch.Tensor], micro: list[tuple[int, list[Item]]]) -> None:
        run = self.run_
        if not (math.isfinite(loss) and math.isfinite(norm_value)):
            self._skip(state, number, loss, losses, micro)
            return
        # Adafactor scales its own updates; ai-toolkit does not clip it either.
        if self.cfg.train.max_grad_norm > 0 and self.cfg.train.optimizer != "adafactor":
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.train.max_grad_norm, norm)
        self.in_optimizer_step = True
        run.optimizer.step()
        self.in_optimizer_step = False
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update()
        run.guard.record_ok()

    def _skip(self, state: _State, number: int, loss: float, losses: list[torch.Tensor],
              micro: list[tuple[int, list[Item]]]) -> None:
        """Drop this step's update, say where the non-finite value came from; stop if it keeps happening."""
        run = self.run_
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()  # the schedule follows the step count, taken or skipped
        bad = next((k for k, value in enumerate(losses) if not torch.isfinite(value)), None)
        if bad is not None:
            index, batch = micro[bad]
            layer = first_nonfinite_output(run.transformer, lambda: self._loss(index, batch, None))
            where = f"non-finite loss ({float(losses[bad])}); first non-finite output: {layer or 'none on replay'}"
            files = ", ".join(str(item.record.path) for item in batch)
        else:
            names = nonfinite_gradients((n, p) for n, p in run.transformer.named_parameters() if p.requires_grad)
            where = f"non-finite gradient in {', '.join(names) or 'another process'} (loss {loss:.4g})"
            files = ", ".join(str(item.record.path) for _, batch in micro for item in batch)
        message = f"step {number}: {where}; images: {files}"
        stop = run.guard.record_skip(message)
        logger.warning("%s -- optimizer step skipped (%d in a row, %d in all)", message, run.guard.in_a_row,
                       run.guard.total)
        if run.runtime.is_main:
            tqdm.write(f"⚠️  {message} -- optimizer step skipped ({run.guard.in_a_row} in a row)")
        if stop:
            state.step += 1  # the skipped step is counted, so a resume starts after these batches
            _save_step(run, state)
            raise NonFiniteError(
                f"{run.guard.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps: {self.cfg.train.max_nonfinite_steps}); the run has diverged.\n"
                + "\n".join(f"  {event}" for event in run.guard.events)
                + f"\nCheckpoint (weights from before these steps): {state.checkpoint}\n"
                "Try a lower train.lr, train.max_grad_norm: 1.0, train.dtype: bf16 instead of fp16, or "
                "coat.enabled: false to compare; check the images listed above")

    def _log(self, state: _State, loss: float, seconds: float, bar) -> None:
        lr = self.run_.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_it=f"{seconds:.2f}",
                        img_s=f"{self.samples_per_step / seconds:.1f}")
        bar.update(1)
        if self.writer is not None:
            self.writer.add_scalar("loss", loss, state.step)
            self.writer.add_scalar("lr", lr, state.step)
            self.writer.add_scalar("seconds_per_step", seconds, state.step)
            self.writer.add_scalar("images_per_second", self.samples_per_step / seconds, state.step)

    def _periodic(self, state: _State, sampler: Sampler | None) -> None:
        cfg = self.cfg
        if state.step >= cfg.train.steps:
            return  # the final save and sample happen after the loop
        save, sample = state.step % cfg.save.save_every == 0, state.step % cfg.sample.sample_every == 0
        if save:
            _save_step(self.run_, state)
        if sample and sampler is not None:
            state.samples += _sample(sampler, self.run_.ema, state.step)
        if save or sample:
            self.run_.runtime.barrier()  # the others wait while the main process writes


def _range_monitor(transformer: nn.Module):
    """Per-layer FP8 overflow/underflow counts, logged every step, when the log level is DEBUG."""
    if not logger.isEnabledFor(logging.DEBUG):
        return None  # counting costs kernels and a sync per step: only when asked for
    from coatflux.core.stats import FP8RangeMonitor

    monitor = FP8RangeMonitor(transformer)  # warns if compiled blocks hide layers from it
    if not monitor.layers:
        logger.debug("FP8 range counts: no FP8 linear to observe")
        monitor.close()
        return None
    return monitor


def _tensorboard(cfg: TrainJobConfig):
    if not cfg.log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: log_dir is set but tensorboard is not installed; "
              "no TensorBoard logs (pip install coatflux[tensorboard])")
        return None
    return SummaryWriter(str(Path(cfg.log_dir) / cfg.name))


# ----------------------------------------------------------------------------------------------
# Saving and sampling (main process only).


def _ema_weights(ema: LoRAEMA | None) -> contextlib.AbstractContextManager:
    """The EMA weights swapped in for saving and sampling (as ai-toolkit does), if there is an EMA."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()


def _sample(sampler: Sampler, ema: LoRAEMA | None, step: int) -> list[Path]:
    with _ema_weights(ema):
        return sampler.sample(step)


def _metadata(cfg: TrainJobConfig, state: _State) -> dict[str, str]:
    trigger = cfg.trigger_word or next((d.trigger_word for d in cfg.datasets if d.trigger_word), None)
    return lora_metadata(state.step, state.epoch, trigger, cfg.name, cfg.meta)


def _checkpoint_state(run: _Run, state: _State) -> dict[str, Any]:
    return {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint(run.cfg), "step": state.step,
            "epoch": state.epoch, "batch_index": state.batch_index, "micro_batches": state.micro_batches,
            "seed": state.seed, "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.scheduler.state_dict(),
            "ema": None if run.ema is None else run.ema.state_dict(), "rng": capture_rng(),
            "nonfinite": run.guard.state_dict(), "weights": run.network.raw_state()}


def _save_checkpoint(run: _Run, state: _State) -> None:
    state.checkpoint = save_checkpoint(run.paths, _checkpoint_state(run, state), run.cfg.save.max_checkpoints_to_keep)


def _save_step(run: _Run, state: _State) -> None:
    """The step's weight file, then its checkpoint (so a checkpoint always has its file beside it)."""
    if not run.runtime.is_main:
        return
    with _ema_weights(run.ema):
        run.network.save_step(run.paths.step_lora(state.step), getattr(torch, run.cfg.save.dtype),
                              _metadata(run.cfg, state))
    _save_checkpoint(run, state)
    prune_step_loras(run.paths, run.cfg.save.max_step_saves_to_keep)


def _save_final(run: _Run, state: _State) -> Path:
    """The final weights; the checkpoint is kept so raising train.steps later continues the run."""
    final = run.paths.final_transformer if run.cfg.network.type == "full" else run.paths.final_lora
    if run.runtime.is_main:
        with _ema_weights(run.ema):
            final = run.network.save_final(run.paths.output_dir, run.cfg.name, getattr(torch, run.cfg.save.dtype),
                                           _metadata(run.cfg, state))
        _save_checkpoint(run, state)
    run.runtime.barrier()
    return final
