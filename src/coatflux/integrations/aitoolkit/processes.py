"""The ``coat_sd_trainer`` / ``coat_diffusion_trainer`` process classes, built inside ai-toolkit.

What: :func:`get_process_class` imports ai-toolkit's ``SDTrainer`` or ``DiffusionTrainer`` and
returns a subclass with :class:`COATProcessMixin` in front. The mixin overrides only two methods and
calls ``super()`` in both, so every other behaviour -- saving, resuming, sampling, the LoRA file
format, the web UI's progress, stop and status updates in ``DiffusionTrainer`` -- is ai-toolkit's:

- ``__init__`` reads and validates the process's ``coat:`` block (the seed's schema, the same
  :class:`~coatflux.core.config.COATConfig` as our own trainer) so a typo fails before any model
  loads, and installs the optimizer factory (:mod:`.optimizer_patch`).
- ``hook_add_extra_train_params`` -- which ai-toolkit calls after its LoRA network is applied and
  right before it builds the optimizer -- hands ``coat.optimizer`` to that factory and, with
  ``coat.activation.use_fp8``, puts the frozen base linears under the LoRA on FP8 (below) and, with
  ``coat.activation.compile_blocks`` or ai-toolkit's ``model.compile``, compiles the transformer's
  blocks with COAT inside them (ai-toolkit's own compilation, which runs after this hook, is then
  switched off for the process). Before that, a FLUX transformer's attention modules are hooked so
  that PyTorch's cuDNN attention, its choice on Hopper, computes correct gradients in FLUX
  (:mod:`coatflux.flux.attention`).

Why subclasses built at import time inside ai-toolkit rather than classes defined here: ai-toolkit
is not a package we can depend on, so its classes exist only in its own process; a class factory
keeps this module importable (and testable against fakes) everywhere.

How FP8 bases compose with ai-toolkit's LoRA (``toolkit/lora_special.py:LoRAModule.apply_to``):
the LoRA module does not replace the base ``Linear``; it sets ``base.forward = lora.forward`` and
keeps the old bound method as ``lora.org_forward``, which its forward calls before adding the LoRA
branch (``toolkit/network_mixins.py:ToolkitModuleMixin.forward``). We therefore build an FP8 copy
of the base (frozen weight stored once in FP8, FP8 GEMM, FP8-saved input) and point
``lora.org_forward`` at it, then drop the base's high-precision weight. The alternative -- replacing
the base module in the tree -- would silently bypass the LoRA (its forward lives on the old object)
and would put the FP8 tensors where ai-toolkit's ``unet.to(dtype=...)`` after each sample would
upcast them. Consequences, all logged: the network's ``can_merge_in`` is set False (as ai-toolkit
does for quantized models; sampling runs the LoRA unmerged), and an optimum-quanto ``qfloat8`` base
(``model.quantize: true``) is dequantized and re-quantized by coatflux -- our FP8 replaces quanto's
for those layers, because quanto keeps the GEMM in bf16 and gives no activation compression.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from coatflux.integrations.aitoolkit.optimizer_patch import (
    FP8_PARAMS_KEY,
    install_optimizer_factory,
    is_coat_optimizer,
)

#: uid -> (ai-toolkit module, base class name); observed at ai-toolkit 27a03a9.
PROCESS_BASES: Mapping[str, tuple[str, str]] = {
    "coat_sd_trainer": ("extensions_built_in.sd_trainer.SDTrainer", "SDTrainer"),
    "coat_diffusion_trainer": ("extensions_built_in.sd_trainer.DiffusionTrainer", "DiffusionTrainer"),
}
#: ai-toolkit's plain LoRA module class; other kinds (LoKr, DoRA, full) keep their own bases.
COMPOSABLE_LORA_CLASSES = ("LoRAModule",)

Converter = Callable[[nn.Linear], nn.Module]


def say(message: str) -> None:
    """ai-toolkit reports on stdout (the web UI shows it); so do we, with a prefix."""
    print(f"[coatflux] {message}", flush=True)


def read_coat_config(process_config: Mapping[str, Any], process_id: int) -> Any:
    from coatflux.core.config import COATConfig

    return COATConfig.from_dict(process_config.get("coat"), path=f"config.process[{process_id}].coat")


# -- FP8 bases under ai-toolkit's LoRA ------------------------------------------------------------


@dataclasses.dataclass
class CompositionReport:
    converted: list[str] = dataclasses.field(default_factory=list)
    requantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    fp8_bases: list[nn.Module] = dataclasses.field(default_factory=list)


def is_quantized_weight(weight: Any) -> bool:
    """optimum-quanto and torchao weights are tensor subclasses with ``dequantize()``."""
    return weight is not None and type(weight) is not nn.Parameter and hasattr(weight, "dequantize")


def plain_linear_from(base: nn.Linear) -> nn.Linear:
    """A frozen ``nn.Linear`` with ``base``'s (dequantized if need be) weight and bias."""
    weight = base.weight.dequantize() if is_quantized_weight(base.weight) else base.weight
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
    return linear


#: ``exclude`` that matches every module name: apply_coat then converts no linear of its own.
_CONVERT_NOTHING = ("",)


def coat_linear_converter(transformer: nn.Module, config: Any, compile_options: Mapping[str, Any] | None = None,
                          device: Any = None) -> Converter:
    """Install COAT's saved-activation compression on ``transformer``; return a base-linear converter.

    ``apply_coat`` is called with every linear excluded: its own conversion would replace the
    LoRA-patched modules in the tree (bypassing the LoRA) and put FP8 buffers where ai-toolkit's
    ``unet.to(dtype=...)`` reaches them. What we keep from it is the compression of saved
    activations -- the eager compressor around the transformer's forward, or with
    ``compile_blocks`` the compiled blocks whose graphs compress what they save (``compile_options``
    go to ``torch.compile``) -- and the model's input cache and GEMM choices, which the converted
    bases share (to_q/to_k/to_v read one input). Either way the fp32 input copy that ai-toolkit's
    LoRA branch saves is compressed too. ``device`` is where the transformer will train (ai-toolkit's
    ``device``): compiled blocks decide there, once, whether their GEMMs run on FP8 tensor cores.
    """
    from coatflux.core.api import apply_coat

    apply_coat(transformer, dataclasses.replace(config, include=(), exclude=_CONVERT_NOTHING),
               device=device, compile_options=compile_options)
    context = getattr(transformer, "coat_context", None)
    if context is None:
        raise RuntimeError("coatflux: apply_coat attached nothing (this PyTorch has no float8 dtypes)")

    def convert(linear: nn.Linear) -> nn.Module:
        return context.fp8_linear(linear, trainable=False)

    return convert


def _selected(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    include = tuple(include)
    return not any(s in name for s in exclude) and (not include or any(s in name for s in include))


def _skip_reason(lora: nn.Module, base: Any, name: str | None, config: Any) -> str | None:
    if type(lora).__name__ not in COMPOSABLE_LORA_CLASSES:
        return f"{type(lora).__name__} is not a plain LoRA module"
    if name is None:
        return "base module is not inside the transformer"
    if not isinstance(base, nn.Linear):
        return f"base is {type(base).__name__}, not a Linear"
    if not _selected(name, config.include, config.exclude):
        return "filtered out by coat.include/exclude"
    return None


def compose_fp8_bases(network: Any, transformer: nn.Module, config: Any, convert: Converter | None = None,
                      compile_options: Mapping[str, Any] | None = None, device: Any = None) -> CompositionReport:
    """Put the base linear under each of ``network``'s transformer LoRA modules on FP8.

    ``convert`` turns a frozen ``nn.Linear`` into a module with the same ``forward(x)`` contract
    (default: :func:`coat_linear_converter`, which also installs the activation compression and,
    with ``compile_blocks``, compiles the blocks with ``compile_options`` for ``device``); tests inject
    a stand-in.
    """
    convert = convert or coat_linear_converter(transformer, config, compile_options, device)
    names = {id(module): name for name, module in transformer.named_modules()}
    report = CompositionReport()
    for lora in getattr(network, "unet_loras", []):
        base = lora.org_module[0]
        name = names.get(id(base))
        reason = _skip_reason(lora, base, name, config)
        if reason is not None:
            report.skipped[name or getattr(lora, "lora_name", "?")] = reason
            continue
        fp8_base = convert(plain_linear_from(base))
        if is_quantized_weight(base.weight):
            report.requantized.append(name)
        # why org_forward: the LoRA's forward (now base.forward) calls it for the frozen path.
        lora.org_forward = fp8_base.forward
        _release_weights(base)
        report.converted.append(name)
        report.fp8_bases.append(fp8_base)
    if report.converted:
        network.can_merge_in = False  # the high-precision base weight is gone; nothing to merge into
    return report


def _release_weights(base: nn.Linear) -> None:
    """Drop the base's own weight and bias: the FP8 copy now holds them, and nothing calls the base."""
    base.register_parameter("weight", None)
    base.register_parameter("bias", None)


# -- the process classes --------------------------------------------------------------------------


class COATProcessMixin:
    """COAT on top of an ai-toolkit trainer process; must come first in the bases."""

    def __init__(self, process_id: int, job: Any, config: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(process_id, job, config, **kwargs)
        self.coat_config = read_coat_config(config, process_id)
        self.coat_fp8_bases: list[nn.Module] = []
        install_optimizer_factory()
        say(f"{type(self).__name__}: coat.enabled={self.coat_config.enabled}, "
            f"activation.use_fp8={self.coat_config.activation.use_fp8}, "
            f"train.optimizer={self.train_config.optimizer}")

    def hook_add_extra_train_params(self, params: list) -> list:
        params = super().hook_add_extra_train_params(params)
        self._route_optimizer_settings()
        self._keep_flux_attention_correct()
        if self.coat_config.enabled and self.coat_config.activation.use_fp8:
            self._put_bases_on_fp8()
        return params

    def _route_optimizer_settings(self) -> None:
        from coatflux.core.config import ConfigError

        if not is_coat_optimizer(self.train_config.optimizer):
            say(f"train.optimizer '{self.train_config.optimizer}' is ai-toolkit's; coat.optimizer is unused")
            return
        options = dict(self.train_config.optimizer_params or {})
        if FP8_PARAMS_KEY in options:
            raise ConfigError(f"train.optimizer_params.{FP8_PARAMS_KEY}: with a coat_* process put these "
                              "settings in the process's coat.optimizer block instead")
        options[FP8_PARAMS_KEY] = self.coat_config.optimizer
        self.train_config.optimizer_params = options

    def _keep_flux_attention_correct(self) -> None:
        """Hook a FLUX transformer's attention so cuDNN's attention backward is correct in it.

        PyTorch picks cuDNN's attention on Hopper, and ai-toolkit does not turn it off; without the
        hook FLUX's backward there faults or, silently, computes wrong gradients
        (:mod:`coatflux.flux.attention`). Before :meth:`_put_bases_on_fp8`, which may compile the
        blocks. Other architectures are left alone.
        """
        from coatflux.flux.attention import keep_attention_grads_contiguous

        transformer = self.sd.unet
        if getattr(transformer, "single_transformer_blocks", None) is None:
            return
        count = keep_attention_grads_contiguous(transformer)
        say(f"FLUX: the gradients of {count} attention modules are made contiguous, so that PyTorch's "
            "cuDNN attention backward is correct in FLUX (coatflux.flux.attention)")

    def _put_bases_on_fp8(self) -> None:
        if getattr(self, "network", None) is None:
            say("coat.activation.use_fp8 needs a LoRA network (network: type: lora); left the model as is")
            return
        if getattr(self.model_config, "low_vram", False) or getattr(self.model_config, "layer_offloading", False):
            say("warning: FP8 bases are not moved by model.low_vram/layer_offloading; they stay on "
                f"{self.device_torch}")
        config, compile_options = self._coat_compile_settings()
        report = compose_fp8_bases(self.network, self.sd.unet, config, compile_options=compile_options,
                                   device=self.device_torch)
        self.coat_fp8_bases = report.fp8_bases
        say(f"FP8 weights + FP8 GEMMs + FP8-saved inputs on {len(report.converted)} LoRA base linears; "
            f"{len(report.skipped)} left as they were; LoRA merge-in for sampling disabled")
        if report.requantized:
            say(f"model.quantize and coat.activation.use_fp8 both set: replaced optimum-quanto weights of "
                f"{len(report.requantized)} linears with coatflux FP8 (others keep quanto)")
        if config.activation.compile_blocks:
            blocks = self.sd.unet.coat_context.compiled_blocks
            say(f"compiled {len(blocks)} transformer blocks with COAT inside them ({compile_options}); "
                "the first step compiles them (minutes on a GPU)")

    def _coat_compile_settings(self) -> tuple[Any, dict[str, Any]]:
        """COAT's config with ``compile_blocks`` on if ai-toolkit's ``model.compile`` asks for compilation.

        Why take ai-toolkit's compilation over: COAT's compiled blocks compress what each graph saves
        inside the graph, and are tested to; ai-toolkit's ``torch.compile`` of each block (after this
        hook) around COAT's eager compressor is neither. ai-toolkit's ``model.compile`` is then
        switched off for this process, so the blocks compile once, with its ``compile_mode``,
        ``compile_dynamic`` and ``compile_fullgraph``.
        """
        from coatflux.core.config import ConfigError

        config = self.coat_config
        options = {"mode": getattr(self.model_config, "compile_mode", "default"),
                   "dynamic": getattr(self.model_config, "compile_dynamic", True),
                   "fullgraph": getattr(self.model_config, "compile_fullgraph", False)}
        key = "coat.activation.compile_blocks"
        if getattr(self.model_config, "compile", False):
            key = "model.compile"
            say("model.compile with coat.activation.use_fp8: coatflux compiles each transformer block with COAT "
                "inside it (coat.activation.compile_blocks) in place of ai-toolkit's compile")
            config = dataclasses.replace(config, activation=dataclasses.replace(config.activation, compile_blocks=True))
            self.model_config.compile = False
        if config.activation.compile_blocks and not getattr(self.sd.unet, "_repeated_blocks", None):
            raise ConfigError(f"config.process[{self.process_id}].{key}: {type(self.sd.unet).__name__} lists no "
                              "repeated blocks for COAT to compile (diffusers' _repeated_blocks); set it to false")
        return config, options


def make_coat_process_class(base: type, name: str) -> type:
    """``class <name>(COATProcessMixin, base)`` -- the mixin's overrides run first and call ``super()``."""
    return type(name, (COATProcessMixin, base), {"__module__": __name__, "__qualname__": name,
                                                  "__doc__": f"{base.__name__} with COAT (coatflux)."})


def get_process_class(uid: str) -> type:
    """Import ai-toolkit's base for ``uid`` (inside ai-toolkit) and return the COAT subclass."""
    if uid not in PROCESS_BASES:
        raise KeyError(f"unknown coatflux process type {uid!r}; known: {', '.join(PROCESS_BASES)}")
    module_name, class_name = PROCESS_BASES[uid]
    base = getattr(importlib.import_module(module_name), class_name)
    install_optimizer_factory()
    return make_coat_process_class(base, f"COAT{class_name}")
