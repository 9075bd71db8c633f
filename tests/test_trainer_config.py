"""Tests of the ai-toolkit YAML loader: the reference example, each loader rule, each error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from coatflux.core.config import COATConfig
from coatflux.trainer.config import ConfigError, ConfigWarning, TrainJobConfig, load_config

# A rewrite of ai-toolkit's config/examples/train_lora_flux_24gb.yaml from its documented schema;
# only the dataset folder (filled in by the fixture) differs.
FLUX_24GB = """
job: extension
config:
  name: "my_first_flux_lora_v1"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      # trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 16
        linear_alpha: 16
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
        push_to_hub: false
      datasets:
        - folder_path: "{folder}"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 512, 768, 1024 ]
      train:
        batch_size: 1
        steps: 2000
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        optimizer: "adamw8bit"
        lr: 1e-4
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: "black-forest-labs/FLUX.1-dev"
        is_flux: true
        quantize: true
      sample:
        sampler: "flowmatch"
        sample_every: 250
        width: 1024
        height: 1024
        prompts:
          - "woman with red hair, playing chess at the park, bomb explosion in the background"
          - "a woman holding a coffee cup, in a beanie, sitting at a cafe"
          - "a horse is a DJ at a night club, fish eye lens, smoke machine, lazer lights, holding a martini"
          - "[trigger] a man showing off his cool new t shirt at the beach, a shark is jumping out of the water"
          - "a bear building a log cabin in the snow covered mountains"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    return images


def _example(folder: Path) -> dict[str, Any]:
    return yaml.safe_load(FLUX_24GB.replace("{folder}", str(folder)))


def _write(tmp_path: Path, data: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data), encoding="utf-8")
    return path


def _load(tmp_path: Path, data: dict[str, Any]) -> TrainJobConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(_write(tmp_path, data))


def _process(data: dict[str, Any]) -> dict[str, Any]:
    return data["config"]["process"][0]


def _error(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        load_config(_write(tmp_path, data))
    return str(info.value)


def _minimal(folder: Path) -> dict[str, Any]:
    return {"job": "extension", "config": {"name": "run", "process": [{
        "type": "sd_trainer", "training_folder": "out", "network": {"type": "lora"},
        "datasets": [{"folder_path": str(folder)}], "model": {"name_or_path": "black-forest-labs/FLUX.1-dev"}}]}}


# ---------------------------------------------------------------------------------------------- example


def test_flux_24gb_example_is_accepted_with_its_values(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "train_lora_flux_24gb.yaml"
    path.write_text(FLUX_24GB.replace("{folder}", str(folder)), encoding="utf-8")
    with pytest.warns(ConfigWarning) as record:
        config = load_config(path)
    assert len(record) == 1  # one line names every ignored key
    assert "push_to_hub" in str(record[0].message) and "gradient_accumulation_steps" in str(record[0].message)
    assert config.name == "my_first_flux_lora_v1" and config.type == "sd_trainer" and config.device == "cuda:0"
    assert config.output_dir == Path("output/my_first_flux_lora_v1")
    assert (config.network.linear, config.network.alpha, config.network.scale) == (16, 16.0, 1.0)
    assert (config.save.dtype, config.save.save_every, config.save.max_step_saves_to_keep) == ("float16", 250, 4)
    (dataset,) = config.datasets
    assert dataset.caption_ext == ".txt" and dataset.caption_dropout_rate == 0.05
    assert dataset.resolution == (512, 768, 1024) and dataset.cache_latents_to_disk
    train = config.train
    assert train.lr == pytest.approx(1e-4) and isinstance(train.lr, float)
    assert (train.steps, train.optimizer, train.dtype, train.gradient_accumulation) == (2000, "adamw8bit", "bfloat16", 1)
    assert train.ema_config.use_ema and train.ema_config.ema_decay == 0.99
    assert config.model.quantize and config.model.dtype == "bfloat16"
    assert "config.process[0].sample.neg" in config.ignored_keys  # FLUX.1-dev has no negative pass
    assert [s.seed for s in config.sample.samples] == [42, 43, 44, 45, 46]  # walk_seed
    assert all((s.width, s.height, s.guidance_scale) == (1024, 1024, 4.0) for s in config.sample.samples)
    assert config.meta == {"name": "my_first_flux_lora_v1", "version": "1.0"}
    assert config.ignored_keys == ("config.process[0].save.push_to_hub", "config.process[0].sample.neg")
    assert config.coat == COATConfig(enabled=False)
    assert config.raw["meta"]["name"] == "my_first_flux_lora_v1"


def test_class_defaults_not_example_values(tmp_path: Path, folder: Path) -> None:
    config = _load(tmp_path, _minimal(folder))
    assert config.train.lr == 1e-6 and config.train.dtype == "float32" and config.train.optimizer == "adamw"
    assert config.train.timestep_type == "sigmoid" and config.train.max_grad_norm == 1.0
    assert config.network.linear == 4 and config.network.alpha == 4.0 and config.network.transformer_only
    assert config.save.save_every == 1000 and config.save.max_step_saves_to_keep == 5
    assert config.datasets[0].resolution == (512,) and config.datasets[0].caption_ext == ".txt"
    assert config.sample.samples == () and config.performance_log_every == 0
    assert config.ignored_keys == ()


def test_json_config_and_coat_block(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["coat"] = {"optimizer": {"m2_format": "e5m2"}, "activation": {"group_size": 256}}
    config = load_config(_write(tmp_path, data, "job.json"))
    assert config.coat.enabled and config.coat.optimizer.m2_format == "e5m2"
    assert config.coat.activation.group_size == 256


def test_coat_block_errors_carry_the_process_path(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["coat"] = {"optimizer": {"m1_format": "e3m4"}}
    assert _error(tmp_path, data).startswith("config.process[0].coat.optimizer.m1_format:")


# ---------------------------------------------------------------------------------------------- loader rules


def test_name_and_env_substitution(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COATFLUX_TEST_OUT", "/runs")
    data = _minimal(folder)
    _process(data)["training_folder"] = "${COATFLUX_TEST_OUT}/lora"
    _process(data)["trigger_word"] = "[name]_tok"
    config = _load(tmp_path, data)
    assert config.training_folder == Path("/runs/lora") and config.trigger_word == "run_tok"
    assert config.datasets[0].trigger_word == "run_tok"  # inherited


def test_unset_env_variable_names_the_key(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COATFLUX_UNSET_VAR", raising=False)
    data = _minimal(folder)
    _process(data)["model"]["name_or_path"] = "${COATFLUX_UNSET_VAR}"
    message = _error(tmp_path, data)
    assert message.startswith("config.process[0].model.name_or_path:") and "COATFLUX_UNSET_VAR" in message


def test_exponent_floats_read_from_yaml(tmp_path: Path, folder: Path) -> None:
    text = yaml.safe_dump(_minimal(folder)).replace("type: lora", "type: lora\n      linear_alpha: 8e0")
    path = tmp_path / "job.yaml"
    path.write_text(text.replace("training_folder: out", "training_folder: out\n    train: {lr: 5e-5}"))
    config = load_config(path)
    assert config.train.lr == pytest.approx(5e-5) and config.network.alpha == 8.0


def test_overrides_apply_before_substitution(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    data["meta"] = {"name": "[name]"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        config = load_config(_write(tmp_path, data), {"config.name": "other", "train.steps": 7})
    assert config.name == "other" and config.meta["name"] == "other" and config.train.steps == 7


def test_process_type_and_count(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["type"] = "diffusion_trainer"
    assert _load(tmp_path, data).type == "diffusion_trainer"
    _process(data)["type"] = "extract"
    assert _error(tmp_path, data).startswith("config.process[0].type:")
    data = _minimal(folder)
    data["config"]["process"].append(dict(_process(data)))
    assert "one process" in _error(tmp_path, data)


def test_job_must_be_extension(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    data["job"] = "train"
    assert _error(tmp_path, data).startswith("job:")


def test_ignored_keys_collected_and_warned_once(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["logging"] = {"log_every": 10}
    _process(data)["model"]["quantize_kwargs"] = {"exclude": []}
    _process(data)["datasets"][0]["is_reg"] = False
    _process(data)["network"]["conv"] = 4
    _process(data)["train"] = {"min_snr_gamma": 5, "bypass_guidance_embedding": False}
    _process(data)["sample"] = {"sample_start_step": 0, "prompts": ["x"]}
    with pytest.warns(ConfigWarning) as record:
        config = load_config(_write(tmp_path, data))
    expected = {"config.process[0].logging", "config.process[0].model.quantize_kwargs",
                "config.process[0].datasets[0].is_reg", "config.process[0].network.conv",
                "config.process[0].train.min_snr_gamma", "config.process[0].train.bypass_guidance_embedding",
                "config.process[0].sample.sample_start_step"}
    assert set(config.ignored_keys) == expected
    assert len(record) == 1 and all(key in str(record[0].message) for key in expected)


@pytest.mark.parametrize(("section", "key", "suggestion"), [
    ("train", "lrr", "lr"), ("network", "linaer", "linear"), ("save", "save_evry", "save_every"),
    ("model", "name_or_pth", "name_or_path"), ("sample", "sample_step", "sample_steps"),
])
def test_unknown_key_names_path_and_closest(tmp_path: Path, folder: Path, section: str, key: str,
                                            suggestion: str) -> None:
    data = _minimal(folder)
    _process(data).setdefault(section, {})[key] = 1
    message = _error(tmp_path, data)
    assert message.startswith(f"config.process[0].{section}.{key}: unknown key")
    assert f"did you mean '{suggestion}'" in message


def test_unknown_dataset_and_process_keys(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["datasets"][0]["caption_extension"] = "txt"
    assert _error(tmp_path, data).startswith("config.process[0].datasets[0].caption_extension: unknown key")
    data = _minimal(folder)
    _process(data)["trainn"] = {}
    assert _error(tmp_path, data).startswith("config.process[0].trainn: unknown key")


# ---------------------------------------------------------------------------------------------- sections


def test_dataset_normalization_and_cache_text_embeddings(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["datasets"] = [{"folder_path": str(folder), "caption_ext": "caption", "resolution": 768,
                                   "trigger_word": "own"},
                                  {"folder_path": str(folder), "caption_ext": ".md"}]
    _process(data)["trigger_word"] = "proc"
    _process(data)["train"] = {"cache_text_embeddings": True}
    first, second = _load(tmp_path, data).datasets
    assert first.caption_ext == ".caption" and second.caption_ext == ".md" and first.resolution == (768,)
    assert (first.trigger_word, second.trigger_word) == ("own", "proc")
    assert first.cache_text_embeddings and second.cache_text_embeddings


def test_gradient_accumulation_legacy_alias(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["train"] = {"gradient_accumulation_steps": 4}
    with pytest.warns(ConfigWarning, match="gradient_accumulation_steps"):
        config = load_config(_write(tmp_path, data))
    assert config.train.gradient_accumulation == 4
    _process(data)["train"] = {"gradient_accumulation_steps": 4, "gradient_accumulation": 2}
    assert "given twice" in _error(tmp_path, data)


def test_ddpm_noise_scheduler_is_flowmatch_with_warning(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["train"] = {"noise_scheduler": "ddpm"}
    with pytest.warns(ConfigWarning, match="flow matching"):
        assert load_config(_write(tmp_path, data)).train.noise_scheduler == "flowmatch"
    _process(data)["train"] = {"noise_scheduler": "euler"}
    assert _error(tmp_path, data).startswith("config.process[0].train.noise_scheduler:")


def test_network_rank_alias_and_alpha(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["network"] = {"type": "lora", "rank": 8, "alpha": 4}
    network = _load(tmp_path, data).network
    assert (network.linear, network.alpha, network.scale) == (8, 4.0, 0.5)
    _process(data)["network"] = {"type": "lora", "network_kwargs": {"only_if_contains": ["single"],
                                                                   "ignore_if_contains": "proj_out"}}
    kwargs = _load(tmp_path, data).network.network_kwargs
    assert kwargs.only_if_contains == ("single",) and kwargs.ignore_if_contains == ("proj_out",)


def test_samples_form_inherits_section_values(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["sample"] = {"width": 768, "seed": 3,
                                "samples": [{"prompt": "a"}, {"prompt": "b", "width": 512, "seed": 9}]}
    first, second = _load(tmp_path, data).sample.samples
    assert (first.prompt, first.width, first.seed) == ("a", 768, 3)
    assert (second.width, second.seed) == (512, 9)


def test_single_file_checkpoint(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    checkpoint = tmp_path / "flux1-dev.safetensors"
    _process(data)["model"]["name_or_path"] = str(checkpoint)
    assert "does not exist" in _error(tmp_path, data)
    checkpoint.write_bytes(b"x")
    assert _load(tmp_path, data).model.is_single_file


@pytest.mark.parametrize(("section", "key", "value", "fragment"), [
    ("train", "steps", "abc", "an integer"),
    ("train", "lr", -1e-4, "> 0"),
    ("train", "batch_size", 0, "an integer >= 1"),
    ("train", "optimizer", "lion", "coat_fp8_adamw, adamw, adamw8bit, adafactor"),
    ("train", "lr_scheduler", "cosine_with_restarts", "constant_with_warmup"),
    ("train", "dtype", "fp8", "choose one of"),
    ("train", "timestep_type", "weighted", "sigmoid"),
    ("train", "loss_type", "mae", "mse"),
    ("train", "train_text_encoder", True, "not supported"),
    ("train", "train_unet", False, "nothing to train"),
    ("train", "gradient_checkpointing", "yes", "true or false"),
    ("save", "dtype", "int8", "choose one of"),
    ("network", "type", "lokr", "plain LoRA"),
    ("network", "linear", 0, "an integer >= 1"),
    ("model", "is_flux", False, "FLUX.1 only"),
    ("model", "arch", "sdxl", "flux"),
    ("model", "compile_mode", "turbo", "reduce-overhead"),
    ("model", "block_compile", "yes", "true or false"),
    ("sample", "format", "gif", "jpg"),
])
def test_section_value_errors(tmp_path: Path, folder: Path, section: str, key: str, value: Any,
                              fragment: str) -> None:
    data = _minimal(folder)
    _process(data).setdefault(section, {})[key] = value
    message = _error(tmp_path, data)
    assert message.startswith(f"config.process[0].{section}.{key}:") and fragment in message


@pytest.mark.parametrize(("key", "value", "where"), [
    ("caption_dropout_rate", 1.5, "caption_dropout_rate"),
    ("resolution", [512, 32], "resolution[1]"),
    ("resolution", "big", "resolution"),
    ("num_repeats", 0, "num_repeats"),
    ("keep_tokens", -1, "keep_tokens"),
])
def test_dataset_value_errors(tmp_path: Path, folder: Path, key: str, value: Any, where: str) -> None:
    data = _minimal(folder)
    _process(data)["datasets"][0][key] = value
    assert _error(tmp_path, data).startswith(f"config.process[0].datasets[0].{where}:")


def test_missing_required_pieces(tmp_path: Path, folder: Path) -> None:
    data = _minimal(folder)
    _process(data)["datasets"][0]["folder_path"] = "/definitely/not/here"
    assert _error(tmp_path, data) == ("config.process[0].datasets[0].folder_path: folder "
                                      "'/definitely/not/here' does not exist")
    for key, expected in [("training_folder", "config.process[0].training_folder: required"),
                          ("model", "config.process[0].model: required"),
                          ("network", "config.process[0].network: required"),
                          ("datasets", "config.process[0].datasets: expected")]:
        data = _minimal(folder)
        del _process(data)[key]
        assert _error(tmp_path, data).startswith(expected)
    data = _minimal(folder)
    del data["config"]["name"]
    assert _error(tmp_path, data).startswith("config.name:")
