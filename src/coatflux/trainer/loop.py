"""The training loop: an ai-toolkit FLUX LoRA job, with COAT FP8 memory savings, start to finish.

Read :func:`train` top to bottom; each phase is one short helper below it:

1. **Check before loading.** The config was validated by ``load_config``; here the dataset folders
   are scanned and the output folder is checked (resume, or refuse to overwrite a finished run)
   before a single weight is read, because loading FLUX takes minutes.
2. **Load and cache.** All components load on the CPU in ``train.dtype``. The batches of the whole
   run are planned up front (they are a pure function of (seed, epoch), see
   :mod:`coatflux.trainer.data`), so every caption and image the run will use is known: with
   caching on, each is encoded exactly once, then the text encoders (and the VAE, unless sampling
   needs it) are freed for the training phase. Sample prompts are encoded with the captions.
3. **Prepare the transformer.** Freeze it; with COAT (``coat.enabled`` and
   ``coat.activation.use_fp8``) its block linears become FP8 linears with compressed saved
   activations (``model.quantize`` alone gives FP8 weights and GEMMs without activation
   compression); *then* LoRA adapters wrap those linears, in fp32. Order matters: LoRA on top of
   FP8Linear lets one FP8 copy of each input serve the frozen GEMM and the adapter's backward.
4. **Train.** Rectified-flow loss (:mod:`coatflux.trainer.timesteps`), ``gradient_accumulation``
   micro-batches per optimizer step, gradient clipping, LR schedule, optional EMA; a tqdm bar,
   optional TensorBoard, the guide's memory lines; LoRA files, ``optimizer.pt`` and samples on
   their periods (:mod:`coatflux.trainer.checkpoint`, :mod:`coatflux.trainer.sampling`).

Determinism is designed in, not hoped for: noise and timesteps come from one CPU generator seeded
by ``training_seed``, latent sampling from a generator seeded by each image's cache key, and
sampling from per-sample generators. With the checkpoint restoring the generator, optimizer,
schedule, EMA, raw LoRA and data position, a run stopped at a checkpoint and resumed ends with
the same LoRA, bit for bit, as an uninterrupted one (on CPU; CUDA kernels may differ in the last
bit between runs).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import itertools
import logging
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coatflux.core.accounting import module_bytes, optimizer_state_bytes, saved_activation_bytes
from coatflux.flux.loading import encode_images, load_flux_components
from coatflux.flux.lora import (
    find_lora_targets,
    inject_lora,
    load_lora_state_dict,
    lora_metadata,
    lora_parameters,
    lora_state_dict,
    read_lora,
    save_lora,
)
from coatflux.flux.packing import pack_latents, prepare_latent_image_ids, prepare_text_ids, unpack_latents
from coatflux.trainer.cache import LatentCache, TextEmbeddingCache, cache_root
from coatflux.trainer.checkpoint import (
    RunPaths,
    capture_rng,
    prepare_output_dir,
    prune_step_loras,
    restore_rng,
    save_checkpoint,
    write_config,
)
from coatflux.trainer.config import TrainJobConfig
from coatflux.trainer.data import Item, TrainingData
from coatflux.trainer.optimizers import LoRAEMA, build_lr_scheduler, build_optimizer
from coatflux.trainer.report import MemoryTable, format_table, memory_line
from coatflux.trainer.sampling import T5_MAX_LENGTH, Sampler, encode_prompts, sample_prompts
from coatflux.trainer.timesteps import noisy_latents, sample_sigmas

logger = logging.getLogger(__name__)
BLOCKS = ("transformer_blocks", "single_transformer_blocks")
CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    """What a finished run produced."""

    lora_path: Path
    output_dir: Path
    samples: list[Path]
    steps: int
    losses: list[float]
    resumed_from: int | None = None
    memory: MemoryTable | None = None


@dataclass
class _State:
    """Everything the loop mutates, in one place (and what the checkpoint saves)."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)


def train(cfg: TrainJobConfig, *, overwrite: bool = False, device: str | torch.device | None = None) -> TrainResult:
    """Train the LoRA described by ``cfg``; resumes from ``optimizer.pt`` when one is there."""
    device = _pick_device(device or cfg.device)
    paths = RunPaths(cfg.output_dir, cfg.name)
    # 1. Check everything that can fail before loading the model.
    data = TrainingData(cfg.datasets, cfg.train.batch_size)
    checkpoint = prepare_output_dir(paths, cfg.train.steps, overwrite)
    state = _initial_state(cfg, checkpoint)
    write_config(paths, cfg.raw)
    # 2. Load, plan the run's batches, fill the caches, free what training does not need.
    dtype = getattr(torch, cfg.train.dtype)
    components = load_flux_components(cfg.model.name_or_path, dtype, "cpu")
    plan = _plan(data, cfg, state)
    caches = _Caches(cfg, components, device, dtype)
    caches.fill(plan, data)
    sampler = _make_sampler(cfg, components, paths, device, dtype)
    caches.release_encoders(keep_vae=sampler is not None or not caches.all_latents_cached)
    # 3. FP8/COAT, then LoRA, then device.
    block_copies = _block_copies(components.transformer)
    _prepare_transformer(components.transformer, cfg, device, state.seed)
    params = lora_parameters(components.transformer)
    optimizer = build_optimizer(params, cfg.train, cfg.coat)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    if cfg.network.pretrained_lora_path and checkpoint is None:
        load_lora_state_dict(components.transformer, read_lora(cfg.network.pretrained_lora_path)[0])
    ema = LoRAEMA(params, cfg.train.ema_config.ema_decay) if cfg.train.ema_config.use_ema else None
    generator = torch.Generator().manual_seed(state.seed)
    if checkpoint is not None:
        _restore(checkpoint, components.transformer, optimizer, scheduler, ema, generator)
        print(f"Resuming {cfg.name} from {paths.checkpoint} at step {state.step} "
              f"(epoch {state.epoch}, batch {state.batch_index}) of {cfg.train.steps}")
    # 4. Train.
    table = _measure_memory(cfg, components.transformer, block_copies, caches, plan[0], device)
    del block_copies
    if sampler is not None and checkpoint is None and not cfg.train.skip_first_sample:
        state.samples += _sample(sampler, ema, 0)
    loop = _Loop(cfg, components.transformer, optimizer, scheduler, ema, generator, caches, device, table)
    loop.run(state, _batch_stream(data, state), paths, sampler)
    final = _save_final(cfg, paths, components.transformer, optimizer, scheduler, ema, generator, state)
    if sampler is not None:
        state.samples += _sample(sampler, ema, state.step)
    return TrainResult(final, paths.output_dir, state.samples, state.step, state.losses,
                       None if checkpoint is None else int(checkpoint["step"]), table)


# ----------------------------------------------------------------------------------------------
# Phase 1: device, seed and resume position.


def _pick_device(name: str | torch.device) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {name!r} requested but CUDA is not available; training on the CPU",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    return device


def _initial_state(cfg: TrainJobConfig, checkpoint: dict[str, Any] | None) -> _State:
    if checkpoint is not None:
        return _State(step=int(checkpoint["step"]), epoch=int(checkpoint["epoch"]),
                      batch_index=int(checkpoint["batch_index"]), seed=int(checkpoint["seed"]))
    # No training_seed: draw one, and record it in the checkpoint so a resume stays consistent.
    seed = cfg.training_seed if cfg.training_seed is not None else random.SystemRandom().randrange(2**31)
    return _State(seed=seed)


def _batch_stream(data: TrainingData, state: _State) -> Iterator[tuple[int, int, list[Item]]]:
    """``(epoch, index, batch)`` forever, from the state's data position."""
    epoch, index = state.epoch, state.batch_index
    while True:
        batches = data.epoch_batches(epoch, state.seed)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


def _plan(data: TrainingData, cfg: TrainJobConfig, state: _State) -> list[list[Item]]:
    """Every micro-batch the rest of the run will use (so caches can be filled once)."""
    count = (cfg.train.steps - state.step) * cfg.train.gradient_accumulation
    return [batch for _, _, batch in itertools.islice(_batch_stream(data, state), max(count, 1))]


# ----------------------------------------------------------------------------------------------
# Phase 2: encoding and caches.


def _latent_generator(key: str) -> torch.Generator:
    # Seeded by the item's content key: the same draw always gets the same latent sample,
    # whatever order items are encoded in (cache fill, resume, no cache).
    return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))


class _Caches:
    """Latents and text embeddings for batches, from the caches or the encoders."""

    def __init__(self, cfg: TrainJobConfig, components, device: torch.device, dtype: torch.dtype) -> None:
        self.components, self.device, self.dtype = components, device, dtype
        root, folders = cache_root(cfg.output_dir), [d.folder_path for d in cfg.datasets]
        vae_id = f"{cfg.model.name_or_path}|vae|{dtype}"
        self.latent = [LatentCache(root / "latents", vae_id, d.cache_latents_to_disk, folders)
                       if d.cache_latents or d.cache_latents_to_disk else None for d in cfg.datasets]
        # ai-toolkit requires all datasets or none to cache text embeddings; we cache if all do.
        cache_text = all(d.cache_text_embeddings for d in cfg.datasets)
        to_disk = all(d.cache_latents_to_disk for d in cfg.datasets)
        self.text = TextEmbeddingCache(root / "text", f"{cfg.model.name_or_path}|te|{dtype}|{T5_MAX_LENGTH}",
                                       to_disk, folders) if cache_text else None
        self.all_latents_cached = all(c is not None for c in self.latent)
        self._key_cache = LatentCache(root / "latents", vae_id, False)  # keys only, never stores
        components.vae.to(device)
        components.text_encoder.to(device)
        components.text_encoder_2.to(device)

    def fill(self, plan: list[list[Item]], data: TrainingData) -> None:
        items = {self._key_cache.key(i): i for b in plan for i in b if self.latent[i.dataset_index] is not None}
        for item in tqdm(list(items.values()), desc="caching latents", disable=not items, leave=False):
            self.latents([item])
        if self.text is not None:
            captions = list(dict.fromkeys(i.caption for b in plan for i in b))
            for caption in tqdm(captions, desc="caching text embeddings", leave=False):
                self.text.embeddings([caption], self._encode_text)

    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # One caption per encoder call: padded batches of different makeup round differently,
        # and a resumed run must see the very same embeddings as an uninterrupted one.
        encoded = [encode_prompts(self.components, [c], self.device, self.dtype) for c in captions]
        return {name: torch.cat([e[name] for e in encoded]) for name in encoded[0]}

    def _encode_item(self, item: Item, key: str) -> torch.Tensor:
        pixels = TrainingData.load_pixels([item])
        return encode_images(self.components.vae, pixels, _latent_generator(key)).to("cpu", torch.float32)

    def latents(self, batch: list[Item]) -> torch.Tensor:
        out = []
        for item in batch:
            cache, key = self.latent[item.dataset_index], self._key_cache.key(item)
            if cache is None:
                out.append(self._encode_item(item, key)[0])
            else:
                # _encode_item decodes the image itself (it needs the key for its generator), so
                # the cache's pixel loader is a no-op.
                out.append(cache.latents([item], lambda _px, i=item, k=key: self._encode_item(i, k),
                                         lambda _items: None)[0])
        return torch.stack(out)

    def text_embeddings(self, batch: list[Item]) -> dict[str, torch.Tensor]:
        captions = [i.caption for i in batch]
        if self.text is not None:
            return self.text.embeddings(captions, self._encode_text)
        return self._encode_text(captions)

    def release_encoders(self, keep_vae: bool) -> None:
        """Free what training does not need: text encoders once captions are cached, the VAE too."""
        c = self.components
        if self.text is not None:
            c.text_encoder = c.text_encoder_2 = None
        if not keep_vae:
            c.vae = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _make_sampler(cfg: TrainJobConfig, components, paths: RunPaths, device: torch.device,
                  dtype: torch.dtype) -> Sampler | None:
    items = cfg.sample.samples
    if cfg.train.disable_sampling or not items:
        return None
    trigger = cfg.trigger_word or next((d.trigger_word for d in cfg.datasets if d.trigger_word), None)
    embeddings = encode_prompts(components, sample_prompts(items, trigger), device, dtype)
    return Sampler(components, items, embeddings, paths.samples, cfg.sample.format, device)


# ----------------------------------------------------------------------------------------------
# Phase 3: the transformer.


def _coat_on(cfg: TrainJobConfig) -> bool:
    return cfg.coat.enabled and cfg.coat.activation.use_fp8


def _prepare_transformer(transformer: nn.Module, cfg: TrainJobConfig, device: torch.device, seed: int) -> None:
    """Freeze, convert to FP8 (COAT or ``model.quantize``), inject LoRA, move to ``device``."""
    from coatflux.core.api import apply_coat, replace_linear_with_fp8

    transformer.requires_grad_(False)
    # Small parts first, so the FP8 conversion sees the target device; the big blocks are
    # quantized where they are (CPU) and moved already in FP8: bf16 FLUX never has to fit.
    for name, child in transformer.named_children():
        if name not in BLOCKS:
            child.to(device)
    if _coat_on(cfg):
        apply_coat(transformer, replace(cfg.coat, include=BLOCKS), device=device)
    elif cfg.model.quantize:
        replace_linear_with_fp8(transformer, replace(cfg.coat, enabled=True, include=BLOCKS), device=device)
    kwargs = cfg.network.network_kwargs
    targets = find_lora_targets(transformer, kwargs.only_if_contains, kwargs.ignore_if_contains)
    # LoRA A is initialized randomly: seed it so the same training_seed gives the same run,
    # without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_lora(transformer, cfg.network.linear, cfg.network.alpha, targets, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device)
    transformer.train()


def _restore(checkpoint: dict[str, Any], transformer: nn.Module, optimizer, scheduler, ema, generator) -> None:
    load_lora_state_dict(transformer, checkpoint["lora"], folded=False)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    # The schedule is a function of train.steps, which a resume usually raises: recompute the
    # current lr from this run's schedule instead of keeping the one the old schedule left.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    if ema is not None and checkpoint.get("ema") is not None:
        ema.load_state_dict(checkpoint["ema"])
    restore_rng(checkpoint["rng"], generator)


# ----------------------------------------------------------------------------------------------
# The forward pass shared by training and the memory measurement.


def flow_matching_loss(transformer: nn.Module, latents: torch.Tensor, text: dict[str, torch.Tensor],
                       cfg: TrainJobConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Mean-squared error between the predicted and the true velocity ``noise - latents``."""
    dtype = next(p.dtype for n, p in transformer.named_parameters() if "lora_" not in n)
    b, _, h, w = latents.shape
    seq_len = (h // 2) * (w // 2)
    sigmas = sample_sigmas(b, cfg.train.timestep_type, seq_len, generator)
    noisy, target = noisy_latents(latents.to(device), sigmas, generator, cfg.train.noise_offset)
    prompt = text["prompt_embeds"].to(device, dtype)
    guidance = (torch.full((b,), cfg.train.cfg_scale, device=device)
                if transformer.config.guidance_embeds else None)
    pred = transformer(
        hidden_states=pack_latents(noisy).to(dtype), encoder_hidden_states=prompt,
        pooled_projections=text["pooled_prompt_embeds"].to(device, dtype), timestep=sigmas.to(device, dtype),
        img_ids=prepare_latent_image_ids(h // 2, w // 2, device, dtype),
        txt_ids=prepare_text_ids(prompt.shape[1], device, dtype), guidance=guidance, return_dict=False)[0]
    return torch.nn.functional.mse_loss(unpack_latents(pred, h, w).float(), target)


# ----------------------------------------------------------------------------------------------
# Memory table: measured on the first batch.


def _block_copies(transformer: nn.Module) -> dict[str, nn.Module]:
    """Unconverted copies of the first double and single block (CPU), for the COAT comparison."""
    return {name: copy.deepcopy(getattr(transformer, name)[0]) for name in BLOCKS if len(getattr(transformer, name))}


class _OneBlock(nn.Module):
    """A block under its real attribute name, so apply_coat / find_lora_targets see the same paths."""

    def __init__(self, attr: str, block: nn.Module) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.ModuleList([block]))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.attr)[0](*args, **kwargs)


def _capture_block_inputs(transformer: nn.Module) -> tuple[dict[str, tuple], list]:
    captured: dict[str, tuple] = {}

    def hook(name):
        def store(_module, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return store
    handles = [getattr(transformer, n)[0].register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in BLOCKS if len(getattr(transformer, n))]
    return captured, handles


def _leaf(value: Any) -> Any:
    if torch.is_tensor(value) and value.is_floating_point() and value.dim() == 3:
        return value.detach().clone().requires_grad_(True)  # hidden states: as in training, need grad
    if isinstance(value, tuple):
        return tuple(_leaf(v) for v in value)
    return value.detach() if torch.is_tensor(value) else value


def _block_bytes(cfg: TrainJobConfig, attr: str, block: nn.Module, inputs: tuple, coat: bool,
                 device: torch.device) -> int:
    from coatflux.core.api import apply_coat

    model = _OneBlock(attr, copy.deepcopy(block) if coat else block).to(device)
    model.requires_grad_(False)
    if coat:
        apply_coat(model, replace(cfg.coat, enabled=True, include=BLOCKS))
    inject_lora(model, cfg.network.linear, cfg.network.alpha, find_lora_targets(model), dtype=torch.float32)
    args, kwargs = _leaf(inputs[0]), {k: _leaf(v) for k, v in inputs[1].items()}
    return saved_activation_bytes(model, lambda: model(*args, **kwargs))


def _measure_memory(cfg: TrainJobConfig, transformer: nn.Module, copies: dict[str, nn.Module], caches: _Caches,
                    batch: list[Item], device: torch.device) -> MemoryTable:
    params = lora_parameters(transformer)
    table = MemoryTable(frozen_weights=module_bytes(transformer, trainable=False),
                        trainable_weights=sum(p.numel() * p.element_size() for p in params),
                        trainable_params=sum(p.numel() for p in params), coat_on=_coat_on(cfg),
                        optimizer_name=cfg.train.optimizer)
    captured, handles = _capture_block_inputs(transformer)
    latents, text = caches.latents(batch), caches.text_embeddings(batch)
    generator = torch.Generator().manual_seed(0)  # never the training generator
    try:
        table.activations_measured = saved_activation_bytes(
            transformer, lambda: flow_matching_loss(transformer, latents, text, cfg, generator, device))
    finally:
        for handle in handles:
            handle.remove()
    counts = {"transformer_blocks": transformer.config.num_layers,
              "single_transformer_blocks": transformer.config.num_single_layers}
    plain = coat = 0
    for attr, block in copies.items():
        if attr in captured:
            coat += _block_bytes(cfg, attr, block, captured[attr], True, device) * counts[attr]
            plain += _block_bytes(cfg, attr, block, captured[attr], False, device) * counts[attr]
    table.blocks_plain, table.blocks_coat = plain, coat
    table.block_note = f"block 0 of each kind x {counts['transformer_blocks']}+{counts['single_transformer_blocks']}"
    return table


# ----------------------------------------------------------------------------------------------
# Phase 4: the step loop.


class _Loop:
    """One optimizer step at a time, with logging, saving and sampling on their periods."""

    def __init__(self, cfg: TrainJobConfig, transformer: nn.Module, optimizer, scheduler, ema, generator,
                 caches: _Caches, device: torch.device, table: MemoryTable) -> None:
        self.cfg, self.transformer, self.optimizer, self.scheduler = cfg, transformer, optimizer, scheduler
        self.ema, self.generator, self.caches, self.device, self.table = ema, generator, caches, device, table
        self.params = lora_parameters(transformer)
        every = cfg.coat.performance_log_every
        self.log_every = every if every is not None else cfg.performance_log_every
        self.writer = _tensorboard(cfg)

    def run(self, state: _State, stream: Iterator, paths: RunPaths, sampler: Sampler | None) -> None:
        total = self.cfg.train.steps
        bar = tqdm(total=total, initial=state.step, desc=self.cfg.name, unit="step")
        try:
            while state.step < total:
                started = time.perf_counter()
                loss = self.step(state, stream)
                state.step += 1
                state.losses.append(loss)
                self._log(state, loss, time.perf_counter() - started, bar)
                self._periodic(state, paths, sampler)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()

    def _report(self, stage: str, step: int) -> None:
        if self.log_every and step % self.log_every == 0:
            tqdm.write(memory_line(stage, step, self.device))

    def step(self, state: _State, stream: Iterator) -> float:
        number, accumulation = state.step + 1, self.cfg.train.gradient_accumulation
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulation):
            epoch, index, batch = next(stream)
            state.epoch, state.batch_index = epoch, index + 1
            if micro == 0:
                self._report("before_forward", number)
            loss = flow_matching_loss(self.transformer, self.caches.latents(batch),
                                      self.caches.text_embeddings(batch), self.cfg, self.generator, self.device)
            if micro == accumulation - 1:
                self._report("after_forward", number)
            (loss / accumulation).backward()
            total += loss.item() / accumulation
        self._report("after_backward", number)
        self._optimizer_step()
        self._report("after_optimizer_step", number)
        if number == 1 or self.table.optimizer_state is None:
            self.table.optimizer_state = optimizer_state_bytes(self.optimizer)
            tqdm.write(format_table(self.table))
        return total

    def _optimizer_step(self) -> None:
        # Adafactor scales its own updates; ai-toolkit does not clip it either.
        if self.cfg.train.max_grad_norm > 0 and self.cfg.train.optimizer != "adafactor":
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()

    def _log(self, state: _State, loss: float, seconds: float, bar) -> None:
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_it=f"{seconds:.2f}")
        bar.update(1)
        if self.writer is not None:
            self.writer.add_scalar("loss", loss, state.step)
            self.writer.add_scalar("lr", lr, state.step)
            self.writer.add_scalar("seconds_per_step", seconds, state.step)

    def _periodic(self, state: _State, paths: RunPaths, sampler: Sampler | None) -> None:
        cfg = self.cfg
        if state.step >= cfg.train.steps:
            return  # the final save and sample happen after the loop
        if state.step % cfg.save.save_every == 0:
            _save_step(cfg, paths, self.transformer, self.optimizer, self.scheduler, self.ema, self.generator, state)
        if sampler is not None and state.step % cfg.sample.sample_every == 0:
            state.samples += _sample(sampler, self.ema, state.step)


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
# Saving and sampling.


def _sample(sampler: Sampler, ema: LoRAEMA | None, step: int) -> list[Path]:
    if ema is None:
        return sampler.sample(step)
    with ema.swapped_in():
        return sampler.sample(step)


def _write_lora(cfg: TrainJobConfig, path: Path, transformer: nn.Module, ema: LoRAEMA | None, state: _State) -> Path:
    dtype = getattr(torch, cfg.save.dtype)
    if ema is None:
        tensors = lora_state_dict(transformer, dtype)
    else:
        with ema.swapped_in():  # the saved LoRA is the EMA, as in ai-toolkit
            tensors = lora_state_dict(transformer, dtype)
    trigger = cfg.trigger_word or next((d.trigger_word for d in cfg.datasets if d.trigger_word), None)
    meta = lora_metadata(state.step, state.epoch, trigger, cfg.name, cfg.meta)
    return save_lora(path, tensors, meta, overwrite=True)


def _checkpoint_state(transformer, optimizer, scheduler, ema, generator, state: _State) -> dict[str, Any]:
    return {"version": CHECKPOINT_VERSION, "step": state.step, "epoch": state.epoch,
            "batch_index": state.batch_index, "seed": state.seed,
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "ema": None if ema is None else ema.state_dict(), "rng": capture_rng(generator),
            "lora": lora_state_dict(transformer, raw=True)}


def _save_step(cfg, paths: RunPaths, transformer, optimizer, scheduler, ema, generator, state: _State) -> None:
    _write_lora(cfg, paths.step_lora(state.step), transformer, ema, state)
    save_checkpoint(paths, _checkpoint_state(transformer, optimizer, scheduler, ema, generator, state))
    prune_step_loras(paths, cfg.save.max_step_saves_to_keep)


def _save_final(cfg, paths: RunPaths, transformer, optimizer, scheduler, ema, generator, state: _State) -> Path:
    final = _write_lora(cfg, paths.final_lora, transformer, ema, state)
    # Kept so that raising train.steps later continues this run instead of starting over.
    save_checkpoint(paths, _checkpoint_state(transformer, optimizer, scheduler, ema, generator, state))
    return final

