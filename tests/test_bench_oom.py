"""``coatflux bench`` after an out-of-memory error: the search goes on, reports right, and leaks nothing.

An OOM is simulated on the CPU by a loss function that raises ``torch.cuda.OutOfMemoryError``
(constructible without CUDA) above a batch size; weak references to every model that saw an OOM
must be dead by the time the next step starts, which is what freeing its memory needs.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from coatflux.bench import model as bench_model


@pytest.fixture
def fake_oom(monkeypatch):
    """``loss_of`` that runs out of memory above batch 2 and records models that did."""
    real_loss_of = bench_model.loss_of
    state = {"oom_models": [], "alive_at_next_step": 0, "steps": 0}

    def loss_of(model, batch):
        gc.collect()
        state["alive_at_next_step"] += sum(ref() is not None for ref in state["oom_models"])
        state["steps"] += 1
        if batch["hidden_states"].shape[0] > 2:
            state["oom_models"].append(weakref.ref(model))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB (simulated)")
        return real_loss_of(model, batch)

    monkeypatch.setattr(bench_model, "loss_of", loss_of)
    return state


def test_oom_during_batch_search_is_released_and_reported(tmp_path, fake_oom):
    from coatflux.bench.__main__ import main

    js = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--configs", "coat", "bf16+ckpt", "--resolutions", "32", "--steps", "1",
                 "--warmup", "0", "--max-batch-cap", "8", "--max-batch-steps", "1", "--json", str(js)]) == 0
    rows = {(r["config"], r["kind"]): r for r in json.loads(js.read_text())["rows"]}
    for config in ("coat", "bf16+ckpt"):
        assert rows[(config, "batch 1")]["status"] == "ok"
        found = rows[(config, "max batch")]
        assert (found["status"], found["batch"], found["max_batch"]) == ("ok", 2, "2"), found
        assert found["step_s"] > 0
    assert len(fake_oom["oom_models"]) == 4  # batch 4 and 3, for each config
    assert fake_oom["alive_at_next_step"] == 0  # no OOM'd model survived into a later step


def test_oom_while_timing_goes_into_the_row(tmp_path, fake_oom):
    from coatflux.bench.__main__ import main

    js = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--configs", "bf16", "--resolutions", "32", "--steps", "1", "--warmup", "0",
                 "--no-max-batch-search", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["rows"][0]["status"] == "ok"
    from coatflux.bench import cli
    from coatflux.bench.report import Row

    row = Row("bf16", 32, 4, "max batch")
    plan = cli._Plan(cli_args(), torch.device("cpu"), None)
    trainee = cli._Trainee("bf16", plan)
    cli._run_guarded(trainee, lambda: cli._time_cell(trainee, plan, row, 1, 0), row)
    assert row.status == "oom" and "OutOfMemoryError" in row.note and trainee.model is None


def cli_args():
    import argparse

    from coatflux.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--preset", "tiny", "--fused-optimizer"])


def test_cudnn_attention_is_disabled_for_the_run_and_recorded(tmp_path):
    from coatflux.bench.__main__ import main
    from coatflux.flux.attention import attention_policy

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_policy(allow_cudnn=False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    md = tmp_path / "b.md"
    assert main(["--preset", "tiny", "--configs", "bf16", "--resolutions", "32", "--budget-s", "0",
                 "--markdown", str(md)]) == 0
    assert "attention (SDPA) backends:" in md.read_text() and "cuDNN disabled" in md.read_text()
    # allowed, the bench also hooks each block's attention (coatflux.flux.attention) and still runs
    assert main(["--preset", "tiny", "--configs", "bf16", "--resolutions", "32", "--budget-s", "0",
                 "--allow-cudnn-attention", "--markdown", str(md)]) == 0
    assert "cuDNN disabled" not in md.read_text() and "| bf16 | 32 | 1 |" in md.read_text()
