"""Unit tests of the ai-toolkit extension that need no ai-toolkit checkout.

The fakes below reproduce only the interfaces read from ostris/ai-toolkit at commit
27a03a91f23eb1b757d5ec2e80ee3e129cfcc350 (main, 2026-08-21, version 0.12.26):
``toolkit/extension.py`` (``Extension`` with ``uid``/``name``/``get_process()``, every package in
``extensions/`` imported), ``BaseSDTrainProcess.__init__(process_id, job, config, **kwargs)`` with
``train_config.optimizer``/``optimizer_params`` and ``hook_add_extra_train_params(params)``, the
module-level ``get_optimizer(params, optimizer_type, learning_rate, optimizer_params)``, and
``LoRAModule.apply_to`` (``org_forward = base.forward; base.forward = lora.forward``). They are written
from those observations; no ai-toolkit code is copied. ``tests/test_aitoolkit_integration.py`` checks
the same things against a real checkout.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from coatflux.core.config import ActivationConfig, COATConfig, ConfigError, FP8QuantizationConfig
from coatflux.core.formats import sqnr_db
from coatflux.integrations.aitoolkit import optimizer_patch, processes
from coatflux.integrations.aitoolkit.install import (
    MANIFEST_NAME,
    AIToolkitPathError,
    ForeignExtensionError,
    install,
    uninstall,
)

FAKE_EXTENSION_PY = '''
import importlib, os, pkgutil
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
class Extension:
    name = None
    uid = None
    @classmethod
    def get_process(cls):
        pass
def get_all_extensions_process_dict():
    found = {}
    for (_, name, _) in pkgutil.iter_modules([os.path.join(ROOT, "extensions")]):
        module = importlib.import_module(f"extensions.{name}")
        for ext in getattr(module, "AI_TOOLKIT_EXTENSIONS", None) or []:
            found[ext.uid] = ext.get_process()
    return found
'''


@pytest.fixture
def fake_aitk(tmp_path: Path) -> Path:
    root = tmp_path / "ai-toolkit"
    (root / "toolkit").mkdir(parents=True)
    (root / "extensions").mkdir()
    (root / "run.py").write_text("# fake\n")
    (root / "toolkit" / "__init__.py").write_text("")
    (root / "toolkit" / "extension.py").write_text(FAKE_EXTENSION_PY)
    return root


# -- install / uninstall --------------------------------------------------------------------------


def test_install_writes_shim_and_manifest(fake_aitk: Path) -> None:
    target = install(fake_aitk)
    assert target == fake_aitk / "extensions" / "coatflux"
    assert "AI_TOOLKIT_EXTENSIONS" in (target / "__init__.py").read_text()
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"__init__.py", MANIFEST_NAME}


def test_install_refuses_a_path_that_is_not_ai_toolkit(tmp_path: Path) -> None:
    (tmp_path / "toolkit").mkdir()
    with pytest.raises(AIToolkitPathError, match=r"missing run\.py, extensions"):
        install(tmp_path)


def test_foreign_folder_needs_force(fake_aitk: Path) -> None:
    foreign = fake_aitk / "extensions" / "coatflux"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("MINE = 1\n")
    with pytest.raises(ForeignExtensionError, match="--force"):
        install(fake_aitk)
    assert (foreign / "__init__.py").read_text() == "MINE = 1\n"
    with pytest.raises(ForeignExtensionError):
        uninstall(fake_aitk)
    install(fake_aitk, force=True)
    assert "AI_TOOLKIT_EXTENSIONS" in (foreign / "__init__.py").read_text()


def test_reinstall_upgrades_and_uninstall_removes_only_ours(fake_aitk: Path) -> None:
    target = install(fake_aitk)
    (target / "__init__.py").write_text("old shim\n")
    install(fake_aitk)  # our own manifest is there: upgrade without force
    assert "AI_TOOLKIT_EXTENSIONS" in (target / "__init__.py").read_text()
    (target / "__pycache__").mkdir()
    (target / "notes.txt").write_text("user file")
    uninstall(fake_aitk)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    (target / "notes.txt").unlink()
    install(fake_aitk)
    uninstall(fake_aitk)
    assert not target.exists()
    uninstall(fake_aitk)  # nothing there: no error


# -- the shim inside a (fake) ai-toolkit, coatflux missing or broken ------------------------------


def _run_in_fake_aitk(root: Path, code: str, extra_path: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in [*extra_path, root]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_shim_without_coatflux_registers_nothing_and_warns(fake_aitk: Path) -> None:
    install(fake_aitk)
    result = _run_in_fake_aitk(fake_aitk, """
        import sys
        sys.modules["coatflux"] = None  # as if not installed in ai-toolkit's environment
        from toolkit.extension import get_all_extensions_process_dict
        import extensions.coatflux as shim
        assert shim.AI_TOOLKIT_EXTENSIONS == [], shim.AI_TOOLKIT_EXTENSIONS
        print("processes", sorted(get_all_extensions_process_dict()))
    """, [])
    assert result.returncode == 0, result.stderr
    assert "processes []" in result.stdout
    assert "not importable" in result.stderr


def test_shim_with_broken_coatflux_fails_only_coat_jobs(fake_aitk: Path, tmp_path: Path) -> None:
    install(fake_aitk)
    broken = tmp_path / "broken"
    (broken / "coatflux").mkdir(parents=True)
    (broken / "coatflux" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    other = fake_aitk / "extensions" / "other"
    other.mkdir()
    (other / "__init__.py").write_text(textwrap.dedent("""
        from toolkit.extension import Extension
        class Other(Extension):
            uid = "other"
            @classmethod
            def get_process(cls):
                return dict
        AI_TOOLKIT_EXTENSIONS = [Other]
    """))
    result = _run_in_fake_aitk(fake_aitk, """
        from toolkit.extension import get_all_extensions_process_dict
        procs = get_all_extensions_process_dict()
        print("processes", sorted(procs))
        assert procs["other"] is dict
        try:
            procs["coat_sd_trainer"](0, None, {})
        except RuntimeError as e:
            print("coat error:", e)
    """, [broken])
    assert result.returncode == 0, result.stderr
    assert "processes ['coat_diffusion_trainer', 'coat_sd_trainer', 'other']" in result.stdout
    assert "broken on purpose" in result.stdout


# -- the optimizer factory patch ------------------------------------------------------------------


def _fake_training_module() -> types.ModuleType:
    module = types.ModuleType("jobs.process.BaseSDTrainProcess")

    def get_optimizer(params, optimizer_type="adam", learning_rate=1e-6, optimizer_params=None):
        if optimizer_type != "adamw":
            raise ValueError(f"Unknown optimizer type {optimizer_type}")
        return torch.optim.AdamW(params, lr=learning_rate, **(optimizer_params or {}))

    module.get_optimizer = get_optimizer
    return module


def test_patch_is_idempotent_and_delegates_other_names() -> None:
    module = _fake_training_module()
    original = module.get_optimizer
    assert optimizer_patch.install_optimizer_factory(module) is True
    assert optimizer_patch.install_optimizer_factory(module) is False
    assert module.get_optimizer.__coatflux_original__ is original
    p = nn.Parameter(torch.zeros(3))
    assert isinstance(module.get_optimizer([p], "adamw", learning_rate=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        module.get_optimizer([p], "nope", learning_rate=1e-3)


def test_coat_name_builds_fp8_adamw_whose_state_reloads_weights_only(tmp_path: Path) -> None:
    optim = pytest.importorskip("coatflux.core.optim", reason="coatflux.core.optim not written yet")
    module = _fake_training_module()
    optimizer_patch.install_optimizer_factory(module)
    p = nn.Parameter(torch.randn(64, 128))
    params = [{"params": [p], "lr": 1e-3}]
    opt = module.get_optimizer(params, "COAT_FP8_ADAMW", learning_rate=1e-3,
                               optimizer_params={"weight_decay": 1e-4, "fp8": {"m2_format": "e5m2"}})
    assert isinstance(opt, optim.FP8AdamW)
    assert opt.fp8_config.m2_format == "e5m2"
    p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    fresh = module.get_optimizer([{"params": [p], "lr": 1e-3}], "coat_fp8_adamw", learning_rate=1e-3)
    fresh.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    with pytest.raises(ConfigError, match=r"train\.optimizer_params\.betz"):
        module.get_optimizer(params, "coat_fp8_adamw", 1e-3, {"betz": (0.9, 0.99)})


# -- the process classes against a fake SDTrainer -------------------------------------------------


class FakeLoRAModule(nn.Module):
    """Mirrors LoRAModule.apply_to / ToolkitModuleMixin.forward's contract (org_forward + LoRA branch)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_up.weight)
        self.org_module = [base]

    def apply_to(self) -> None:
        self.org_forward = self.org_module[0].forward
        self.org_module[0].forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.org_forward(x) + self.lora_up(self.lora_down(x.float())).to(x.dtype)


FakeLoRAModule.__name__ = "LoRAModule"


class FakeNetwork:
    def __init__(self, transformer: nn.Module) -> None:
        self.unet_loras = [FakeLoRAModule(m) for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
        for lora in self.unet_loras:
            lora.apply_to()
        self.can_merge_in = True


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8)))


class FakeSDTrainer:
    """The slice of BaseSDTrainProcess/SDTrainer the mixin touches."""

    def __init__(self, process_id, job, config, **kwargs):
        self.process_id = process_id
        train = config.get("train", {})
        self.train_config = types.SimpleNamespace(optimizer=train.get("optimizer", "adamw"),
                                                  optimizer_params=train.get("optimizer_params", {}))
        self.model_config = types.SimpleNamespace(quantize=False, low_vram=False, layer_offloading=False)
        self.device_torch = torch.device("cpu")
        self.sd = types.SimpleNamespace(unet=_transformer())
        self.network = FakeNetwork(self.sd.unet)
        self.hook_calls: list[str] = []

    def hook_add_extra_train_params(self, params):
        self.hook_calls.append("base")
        return params


class FakeDiffusionTrainer(FakeSDTrainer):
    def hook_add_extra_train_params(self, params):
        self.hook_calls.append("ui")
        return super().hook_add_extra_train_params(params)


@pytest.fixture
def patched_training_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = _fake_training_module()
    monkeypatch.setitem(sys.modules, optimizer_patch.PATCH_TARGET, module)
    return module


def _identity_converter(linear: nn.Linear) -> nn.Module:
    copy = nn.Linear(linear.in_features, linear.out_features)
    copy.load_state_dict(linear.state_dict())
    copy.requires_grad_(False)
    copy.converted_by_test = True
    return copy


def test_process_class_reads_coat_block_and_routes_optimizer(patched_training_module, monkeypatch) -> None:
    monkeypatch.setattr(processes, "coat_linear_converter", lambda transformer, config, options, device: _identity_converter)
    cls = processes.make_coat_process_class(FakeDiffusionTrainer, "COATDiffusionTrainer")
    config = {"train": {"optimizer": "coat_fp8_adamw"},
              "coat": {"optimizer": {"m1_format": "e5m2"}, "include": ["2."]}}
    proc = cls(0, None, config)
    assert isinstance(proc.coat_config, COATConfig)
    assert hasattr(patched_training_module.get_optimizer, "__coatflux_original__")
    proc.hook_add_extra_train_params([])
    assert proc.hook_calls == ["ui", "base"]  # the UI trainer's own hook still runs
    fp8 = proc.train_config.optimizer_params["fp8"]
    assert isinstance(fp8, FP8QuantizationConfig) and fp8.m1_format == "e5m2"
    assert len(proc.coat_fp8_bases) == 1  # include ["2."] selects the nested linear "2.0" only


class _FluxLikeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)


@pytest.mark.parametrize("flux", [True, False])
def test_process_hooks_a_flux_transformers_attention_for_cudnn(patched_training_module, capsys, flux: bool) -> None:
    """A FLUX transformer's attention gets the contiguous-gradient hook (cuDNN's backward is wrong
    in FLUX without it), whatever the coat block says; another architecture is left alone."""
    from coatflux.flux.attention import _contiguous_grads

    cls = processes.make_coat_process_class(FakeSDTrainer, "COATSDTrainer")
    proc = cls(0, None, {"coat": {"enabled": False}})
    if flux:
        proc.sd.unet = types.SimpleNamespace(transformer_blocks=[_FluxLikeBlock()],
                                             single_transformer_blocks=[_FluxLikeBlock(), _FluxLikeBlock()])
    proc.hook_add_extra_train_params([])
    out = capsys.readouterr().out
    if flux:
        blocks = [*proc.sd.unet.transformer_blocks, *proc.sd.unet.single_transformer_blocks]
        assert all(list(b.attn._forward_hooks.values()) == [_contiguous_grads] for b in blocks)
        assert "gradients of 3 attention modules are made contiguous" in out
    else:
        assert "attention modules" not in out
        assert not any(m._forward_hooks for m in proc.sd.unet.modules())


def test_process_class_rejects_bad_coat_block_with_its_path(patched_training_module) -> None:
    cls = processes.make_coat_process_class(FakeSDTrainer, "COATSDTrainer")
    with pytest.raises(ConfigError, match=r"config\.process\[0\]\.coat\.optimizr"):
        cls(0, None, {"coat": {"optimizr": {}}})


def _compile_run(monkeypatch: pytest.MonkeyPatch, coat: dict, repeated_blocks: list[str] | None,
                 **model_config: object) -> tuple[object, list]:
    """A process whose hook ran with a recording converter; returns it and the converter's calls."""
    calls = []

    def converter(transformer, config, options, device):
        assert device == torch.device("cpu")  # the process's device_torch
        calls.append((config, options))
        transformer.coat_context = types.SimpleNamespace(compiled_blocks=["0"])
        return _identity_converter

    monkeypatch.setattr(processes, "coat_linear_converter", converter)
    cls = processes.make_coat_process_class(FakeSDTrainer, "COATSDTrainer")
    proc = cls(0, None, {"coat": coat})
    proc.model_config.__dict__.update(model_config)
    proc.sd.unet._repeated_blocks = repeated_blocks
    proc.hook_add_extra_train_params([])
    return proc, calls


def test_aitoolkit_model_compile_becomes_coat_compiled_blocks(patched_training_module, monkeypatch, capsys) -> None:
    proc, calls = _compile_run(monkeypatch, {}, ["Sequential"], compile=True, compile_mode="default",
                               compile_dynamic=False, compile_fullgraph=True)
    (config, options), = calls
    assert config.activation.compile_blocks is True
    assert options == {"mode": "default", "dynamic": False, "fullgraph": True}
    assert proc.model_config.compile is False  # ai-toolkit's own compile would wrap the blocks again
    assert "compiled 1 transformer blocks with COAT inside them" in capsys.readouterr().out


def test_coat_compile_blocks_keeps_aitoolkit_compile_settings_and_defaults(patched_training_module, monkeypatch) -> None:
    _, calls = _compile_run(monkeypatch, {"activation": {"compile_blocks": True}}, ["Sequential"])
    (config, options), = calls
    assert config.activation.compile_blocks is True
    assert options == {"mode": "default", "dynamic": True, "fullgraph": False}  # ai-toolkit's defaults


def test_compiled_blocks_need_repeated_blocks_and_the_error_names_the_key(patched_training_module, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"config\.process\[0\]\.coat\.activation\.compile_blocks: Sequential"):
        _compile_run(monkeypatch, {"activation": {"compile_blocks": True}}, None)
    with pytest.raises(ConfigError, match=r"config\.process\[0\]\.model\.compile: Sequential lists no repeated"):
        _compile_run(monkeypatch, {}, None, compile=True)


def test_compose_keeps_lora_output_and_gradients() -> None:
    transformer = _transformer()
    network = FakeNetwork(transformer)
    x = torch.randn(4, 8)
    before = transformer(x)
    report = processes.compose_fp8_bases(network, transformer, COATConfig(), convert=_identity_converter)
    assert report.converted == ["0", "2.0"] and network.can_merge_in is False
    assert transformer[0].weight is None  # high-precision copy released
    after = transformer(x)
    torch.testing.assert_close(after, before)
    after.sum().backward()
    assert network.unet_loras[0].lora_down.weight.grad is not None


def test_compose_honours_exclude_and_skips_other_lora_kinds() -> None:
    transformer = _transformer()
    network = FakeNetwork(transformer)
    network.unet_loras[1].__class__ = type("LokrModule", (FakeLoRAModule,), {})
    report = processes.compose_fp8_bases(network, transformer, COATConfig(exclude=("nothing",)),
                                         convert=_identity_converter)
    assert report.converted == ["0"] and "2.0" in report.skipped
    report = processes.compose_fp8_bases(FakeNetwork(t := _transformer()), t, COATConfig(exclude=("2.",)),
                                         convert=_identity_converter)
    assert report.converted == ["0"]


def test_compose_with_real_coat_linear() -> None:
    pytest.importorskip("coatflux.core.api", reason="coatflux.core.api (apply_coat) not written yet")
    transformer = _transformer()
    network = FakeNetwork(transformer)
    x = torch.randn(4, 8)
    before = transformer(x)
    processes.compose_fp8_bases(network, transformer, COATConfig())
    assert transformer.coat_context.converted == []  # bases converted by us, under the LoRA
    after = transformer(x)
    after.sum().backward()
    assert network.unet_loras[0].lora_down.weight.grad is not None
    assert after.shape == before.shape
    assert (after - before).abs().max() < 0.25 * before.abs().max()  # FP8 error, not a different function


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.down(torch.nn.functional.gelu(self.up(hidden_states)))


class _Blocks(nn.Module):
    _repeated_blocks = ("_Block",)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states=hidden_states)
        return hidden_states


def test_compose_with_compiled_blocks_matches_eager_composition() -> None:
    """The bases under ai-toolkit's LoRA run inside COAT's compiled blocks: same loss and LoRA grads."""
    torch.manual_seed(0)
    original = _Blocks().requires_grad_(False)
    x = torch.randn(2, 48, 32)
    results = []
    for compile_blocks in (False, True):
        transformer = copy.deepcopy(original)
        torch.manual_seed(1)  # the same LoRA weights for both
        network = FakeNetwork(transformer)
        config = COATConfig(activation=ActivationConfig(compile_blocks=compile_blocks, min_saved_numel=0))
        report = processes.compose_fp8_bases(network, transformer, config, compile_options={"backend": "aot_eager"},
                                             device="cpu")
        context = transformer.coat_context
        assert all(base.planner is context.planner and base.input_cache is context.input_cache
                   for base in report.fp8_bases)
        assert context.compiled_blocks == (["blocks.0", "blocks.1"] if compile_blocks else [])
        loss = transformer(x).square().mean()
        loss.backward()
        results.append((loss.detach(), [lora.lora_down.weight.grad for lora in network.unet_loras]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert sqnr_db(eager_loss, compiled_loss) > 30
    for eager, compiled in zip(eager_grads, compiled_grads, strict=True):
        assert sqnr_db(eager, compiled) > 20
