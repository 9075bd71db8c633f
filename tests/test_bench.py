"""``coatflux bench`` on CPU: the tiny preset end to end, the batch search, the FLOP count and the outputs."""

from __future__ import annotations

import json
import time

import pytest
import torch

from coatflux.bench.configs import CONFIGS, FP8StorageLinear
from coatflux.bench.measure import find_max_batch
from coatflux.bench.model import PRESETS, count_step_flops


@pytest.fixture
def one_thread():
    """2-core CI boxes: one intra-op thread avoids oversubscription stalls (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_preset_end_to_end_writes_every_row(tmp_path, one_thread):
    from coatflux.bench.__main__ import main

    js, md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    start = time.monotonic()
    # one resolution (the preset has two); compiled rows traced, not code-generated
    rc = main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--json", str(js), "--markdown", str(md),
               "--resolutions", "32", "--compile-backend", "aot_eager", "--no-compile-dynamic"])
    assert rc == 0
    assert time.monotonic() - start < 90
    result = json.loads(js.read_text())
    rows = result["rows"]
    batch1 = {(r["config"], r["resolution"]) for r in rows if r["kind"] == "batch 1"}
    assert batch1 == {(c, 32) for c in CONFIGS}
    for r in rows:
        if r["config"].startswith("torchao") and r["status"] == "not installed":
            continue
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["steps"] >= 1 and r["peak_gb"] is None  # CPU: memory n/a, not guessed
        if r["kind"] == "batch 1":
            assert r["first_step_s"] > 0
    compiled = next(r for r in rows if r["config"] == "coat-compiled")
    assert compiled["first_step_s"] > 3 * compiled["step_s"]  # the first step traces the blocks
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    assert {r["config"] for r in rows if r["kind"] == "max batch"} == {"bf16", "coat", "bf16+ckpt", "coat+ckpt"}
    text = md.read_text()
    assert "No GPU run yet" in text and "| coat+ckpt |" in text and "torch " + torch.__version__ in text
    assert "COAT's FP8 GEMM accumulation: fast" in text


@pytest.mark.parametrize("choice", ["fast", "precise"])
def test_fp8_accumulation_option_reaches_every_coat_linear(choice):
    import argparse

    from coatflux.bench.cli import _Plan, add_arguments
    from coatflux.bench.configs import prepare_coat_compiled
    from coatflux.bench.model import PRESETS, build_transformer
    from coatflux.core.linear import FP8Linear

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--fp8-accumulation", choice, "--compile-backend", "aot_eager"])
    options = _Plan(args, torch.device("cpu"), None).options()
    model = build_transformer(PRESETS["tiny"], "cpu")
    prepare_coat_compiled(model, 4, options)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert layers and all(m.fast_accum is (choice == "fast") for m in layers)


def test_compiled_configs_compile_as_the_trainer_does_unless_told():
    import argparse

    from coatflux.bench.cli import add_arguments
    from coatflux.bench.configs import SetupOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).compile_dynamic is True  # ai-toolkit's compile_dynamic default
    assert parser.parse_args(["--no-compile-dynamic"]).compile_dynamic is False
    assert SetupOptions(compile_backend="aot_eager").compile_options() == {"backend": "aot_eager", "dynamic": True}


def test_budget_skips_work_and_says_so(tmp_path, one_thread):
    from coatflux.bench.__main__ import main

    js = tmp_path / "b.json"
    assert main(["--preset", "tiny", "--configs", "bf16", "coat", "--resolutions", "32", "--budget-s", "0",
                 "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "budget" in r["note"] for r in rows)


@pytest.mark.parametrize(("limit", "cap", "expected", "capped"), [(1, 16, 1, False), (5, 16, 5, False),
                                                                  (16, 16, 16, True), (11, 64, 11, False)])
def test_find_max_batch_doubles_then_bisects(limit, cap, expected, capped):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    search = find_max_batch(fits, cap)
    assert (search.max_batch, search.capped) == (expected, capped)
    assert len(tried) <= 2 * cap.bit_length()


def test_find_max_batch_stops_when_declined():
    search = find_max_batch(lambda b: None if b > 2 else True, 16)
    assert search.max_batch == 2 and "budget" in search.note and search.label() == ">=2"


def test_flux_dev_flops_match_the_hand_count():
    # peers.md section 8: a LoRA step at 1024^2 is ~163.6 TFLOP without LoRA's own ~1%; 512^2 ~45.
    f1024 = count_step_flops(PRESETS["flux-dev"], 1024)
    assert 163e12 < f1024.total < 167e12
    assert f1024.linear_calls > 494 and f1024.attention_calls == 57
    assert 44e12 < count_step_flops(PRESETS["flux-dev"], 512).total < 46.5e12


def test_fp8_storage_linear_matches_upcast_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).requires_grad_(False)
    fp8 = FP8StorageLinear(lin)
    x = torch.randn(5, 32, requires_grad=True)
    y = fp8(x)
    w = fp8.weight_fp8.float() * fp8.weight_scale
    torch.testing.assert_close(y, x @ w.t() + lin.bias)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ w)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and not list(fp8.parameters())


def test_resolution_order_measures_every_config_at_one_resolution_first(tmp_path, one_thread):
    from coatflux.bench.__main__ import main

    js = tmp_path / "b.json"
    assert main(["--preset", "tiny", "--configs", "bf16", "fp8-storage", "--resolutions", "32", "64",
                 "--order", "resolution", "--no-max-batch-search", "--steps", "1", "--warmup", "0",
                 "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["config"], r["resolution"]) for r in rows] == [
        ("bf16", 32), ("fp8-storage", 32), ("bf16", 64), ("fp8-storage", 64)]
    assert all(r["status"] == "ok" for r in rows)


def _saved_report(path, rows):
    from coatflux.bench.measure import MatmulRates
    from coatflux.bench.report import Report, Row

    env = {"date": "2026-01-02 03:04 UTC", "device": "cuda", "preset": "tiny", "torch": "9.9", "cuda": "13.0",
           "python": "3.12", "platform": "Linux", "command": "coatflux bench --preset tiny", "card": "Some GPU",
           "memory_gb": 80.0, "capability": "9.0", "driver": "1.2.3", "attention": "flash"}
    report = Report(env, MatmulRates(size=256, bf16=1e12, fp8=2e12, fp8_note=""), [Row(**row) for row in rows],
                    ["whole run took 5 s"])
    path.write_text(json.dumps(report.to_json()), encoding="utf-8")


def test_render_writes_a_saved_run_with_what_it_did_not_measure(tmp_path):
    from coatflux.cli import main

    saved, md = tmp_path / "run.json", tmp_path / "benchmarks.md"
    _saved_report(saved, [{"config": "bf16", "resolution": 64, "batch": 1, "kind": "batch 1", "step_s": 0.123456,
                           "steps": 10, "peak_gb": 1.5, "speedup": 1.0},
                          {"config": "coat", "resolution": 64, "batch": 1, "kind": "batch 1", "step_s": 0.2,
                           "steps": 10, "peak_gb": 0.75, "speedup": 0.62},
                          {"config": "coat", "resolution": 64, "batch": 4, "kind": "max batch", "step_s": 0.5,
                           "steps": 3, "max_batch": "4"}])
    assert main(["bench", "--render", str(saved), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "| bf16 | 64 | 1 | 0.123 (n=10) |" in text and "| coat | 64 | 1 | 0.200 (n=10) |" in text
    assert "| coat, largest batch | 64 | 4 | 0.500 (n=3) |" in text
    assert "- card: Some GPU" in text and "- date: 2026-01-02 03:04 UTC" in text  # the run's, not today's
    assert "- rendered from run.json" in text and "Rendered on " in text
    absent = text.split("Not in this run, so not measured on this card:")[1].split("FLOPs per")[0]
    assert "`coat-compiled`" in absent and "`bf16`" not in absent and "`coat`:" not in absent
    assert json.loads(saved.read_text())["rows"][0]["step_s"] == 0.123456  # the input is left as it was


def test_render_keeps_several_runs_apart(tmp_path):
    from coatflux.cli import main

    first, second, md = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "benchmarks.md"
    _saved_report(first, [{"config": "bf16", "resolution": 64, "batch": 1, "kind": "batch 1", "step_s": 0.3,
                           "steps": 10, "speedup": 1.0}])
    _saved_report(second, [{"config": "coat", "resolution": 32, "batch": 1, "kind": "batch 1", "step_s": 0.1,
                            "steps": 10}])
    assert main(["bench", "--render", str(first), str(second), "--markdown", str(md)]) == 0
    text = md.read_text()
    run1, run2 = text.split("## Run 1 of 2: ")[1].split("## Run 2 of 2: ")
    assert "| bf16 | 64 | 1 | 0.300 (n=10) |" in run1 and "| coat |" not in run1
    assert "| coat | 32 | 1 | 0.100 (n=10) |" in run2.split("Not in any of these runs")[0]
    assert "- rendered from a.json" in run1 and "- rendered from b.json" in run2
    absent = text.split("Not in any of these runs, so not measured on this card:")[1].split("FLOPs per")[0]
    assert "`bf16`" not in absent and "`coat`:" not in absent and "`coat+ckpt`" in absent
    assert "32px" in text and "64px" in text  # both runs' resolutions in the FLOP line


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    ("{not json", "not JSON"),
    ('{"rows": []}', "not a coatflux bench JSON report"),
    ('{"environment": {"preset": "flux-xl"}, "rates": null, "rows": []}', "environment.preset 'flux-xl'"),
])
def test_render_names_the_file_it_cannot_read(tmp_path, capsys, content, message):
    from coatflux.cli import main

    saved = tmp_path / "run.json"
    if content is not None:
        saved.write_text(content, encoding="utf-8")
    assert main(["bench", "--render", str(saved), "--markdown", str(tmp_path / "b.md")]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and message in err, err
    assert not (tmp_path / "b.md").exists()


def test_render_needs_a_markdown_path_and_no_json(tmp_path, capsys):
    from coatflux.cli import main

    saved = tmp_path / "run.json"
    _saved_report(saved, [])
    assert main(["bench", "--render", str(saved)]) == 2
    assert main(["bench", "--render", str(saved), "--markdown", str(tmp_path / "b.md"), "--json", str(saved)]) == 2
    assert "--render: give --markdown" in capsys.readouterr().err


def test_cudagraph_configs_mark_every_step(monkeypatch):
    """The ``+cudagraphs`` recipes compile with mode reduce-overhead, and their steps mark a new
    step for inductor's CUDA graph trees; the others do not."""
    from coatflux.bench.configs import SetupOptions
    from coatflux.bench.model import step_functions

    assert CONFIGS["coat-compiled+cudagraphs"].cudagraphs(SetupOptions())
    assert CONFIGS["bf16-compiled+cudagraphs"].options().compile_options()["mode"] == "reduce-overhead"
    assert not CONFIGS["coat-compiled"].cudagraphs(SetupOptions())
    assert not CONFIGS["coat-compiled+cudagraphs"].cudagraphs(SetupOptions(compile_backend="aot_eager"))
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(marks)))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr("coatflux.bench.model.loss_of", lambda m, data: m(data).square().mean())
    for cudagraphs in (True, False):
        forward_backward, optimizer_step = step_functions(model, optimizer, torch.randn(2, 4), cudagraphs)
        for _ in range(3):
            forward_backward()
            optimizer_step()
            assert model.weight.grad is None  # dropped before the next replay could overwrite it
    assert marks == [0, 1, 2]


def test_profile_flag_profiles_the_timed_model(tmp_path, one_thread):
    from coatflux.bench.__main__ import main

    js, md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    rc = main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--json", str(js), "--markdown", str(md),
               "--resolutions", "32", "--configs", "bf16", "coat", "--profile", "coat", "--no-max-batch-search"])
    assert rc == 0
    result = json.loads(js.read_text())
    (profile,) = result["profiles"]
    assert profile["config"] == "coat" and profile["resolution"] == 32 and profile["step_ms"] > 0
    assert any("FP8" in name or "fp8" in name.lower() for name, _, _ in profile["top_cpu_ops"])
    rows = {r["config"]: r for r in result["rows"]}
    assert "profiled: step" in rows["coat"]["note"] and "profiled" not in rows["bf16"]["note"]
    assert "## Profiled steps" in md.read_text() and "32 px, coat: step" in md.read_text()


def test_a_failed_profile_keeps_the_timing(tmp_path, one_thread, monkeypatch):
    from coatflux.bench import profile
    from coatflux.bench.__main__ import main

    def broken(step, device, name, top=20):
        raise RuntimeError("profiler unavailable here")

    monkeypatch.setattr(profile, "profile_step", broken)
    js = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--json", str(js), "--resolutions", "32",
                 "--configs", "bf16", "--profile", "bf16", "--no-max-batch-search"]) == 0
    (row,) = json.loads(js.read_text())["rows"]
    assert row["status"] == "ok" and row["step_s"] > 0
    assert "profile failed: RuntimeError: profiler unavailable here" in row["note"]


def test_a_finished_cudagraph_config_releases_its_graphs(monkeypatch):
    """CUDA graph trees outlive the model they were recorded for (and hold its pool): finishing a
    ``+cudagraphs`` config resets them, so the next config's peak memory is its own."""
    import argparse

    from coatflux.bench.cli import _Plan, _Trainee

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    args = argparse.Namespace(fused_optimizer=None, compile_backend="inductor", compile_dynamic=True,
                              fp8_accumulation="fast")
    plan = _Plan(args, torch.device("cpu"), None)
    _Trainee("coat-compiled", plan).finish()
    assert resets == []
    _Trainee("coat-compiled+cudagraphs", plan).finish()
    assert resets == [1]


def test_profile_summary_counts_kernels_once_by_category():
    """Kernel names from an H100 profile (2026-11-27): FlashAttention's name CUTLASS in their template
    arguments, and the optimizer's user annotation on the GPU timeline spans kernels counted on their own."""
    from types import SimpleNamespace

    from coatflux.bench.profile import format_summary, summarize

    clock = [0.0]

    def gpu(name, us, annotation=False, start=None):  # kernels one after another; an annotation spans
        begin = clock[0] if start is None else start
        if not annotation:
            clock[0] = begin + us
        return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us, start=begin, end=begin + us))

    events = [gpu("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, "
                  "128, 8, 2, 4, 2, false, false, cutlass::bfloat16_t>>(pytorch_flash::Flash_bwd_params)", 2000),
              gpu("nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", 1000),
              gpu("triton_poi_fused_add_13", 500),
              gpu("Optimizer.step#FusedFP8AdamW.step", 300, annotation=True),
              # inside the optimizer's span: its own Triton kernel is the optimizer's, not "compiled"
              gpu("triton_per_fused_abs_add_amax_0", 200),
              gpu("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>>(...)", 100)]
    def cpu(name, *kernels):
        return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CPU,
                               kernels=[SimpleNamespace(name=k) for k in kernels])

    events += [cpu("aten::copy_", "memcpy128", "memcpy128"), cpu("aten::_foreach_copy_", "memcpy128"),
               cpu("## Call CompiledFxGraph fabc ##", "triton_poi_fused_add_13", "memcpy128", "memcpy128",
                   "memcpy128"), gpu("memcpy128", 50, start=0.0), gpu("memcpy128", 40, start=100.0)]
    cpu_op = SimpleNamespace(key="cudaGraphLaunch", self_cpu_time_total=50.0, count=2)
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: [cpu_op])
    summary = summarize("coat", prof, step_ms=4.0, device=torch.device("cuda"), top=6)
    # who launched each top kernel, most frequent first
    assert summary["kernel_launchers"]["memcpy128"] == [("## Call CompiledFxGraph fabc ##", 3), ("aten::copy_", 2),
                                                        ("aten::_foreach_copy_", 1)]
    assert summary["kernel_launchers"]["triton_poi_fused_add_13"] == [("## Call CompiledFxGraph fabc ##", 1)]
    assert "from ## Call CompiledFxGraph fabc ## x3, aten::copy_ x2" in format_summary(summary)
    assert summary["by_category_ms"] == pytest.approx(
        {"attention": 2.0, "gemm": 1.0, "compiled": 0.5, "optimizer": 0.3, "other": 0.09})
    assert summary["gpu_busy_ms"] == pytest.approx(3.89) and summary["kernel_launches"] == 7
