"""The benchmark scripts still run (on the tiny FLUX, in seconds); their figures are not checked here."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_flux_block_memory_runs_and_coat_saves_less_than_bf16() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "flux_block_memory.py"), "--width", "tiny", "--resolution", "64",
         "--recipes", "bf16", "coat"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("bf16", "coat"))}
    assert set(rows) == {"bf16", "coat"}, result.stdout
    assert "2 + 2 blocks" in result.stdout
    # columns: recipe, double, single, rest, blocks total, + weights
    assert 0 < float(rows["coat"][4]) < float(rows["bf16"][4])


def test_attention_backends_measures_each_backend_in_its_own_process(tmp_path) -> None:
    out = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attention_backends.py"), "--device", "cpu", "--backends", "flash",
         "math", "efficient", "--tokens", "80", "--heads", "2", "--head-dim", "32", "--repeats", "2",
         "--layouts", "flux-single", "contiguous", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["backend"], row["layout"]): row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6
    for name in ("flash", "math"):  # bf16 against the fp32 reference: close, not equal
        for layout in ("flux-single", "contiguous"):
            row = rows[name, layout]
            assert row["ms"] > 0 and 35 < min(row["sqnr_db"].values()) < 100, row
    # no CPU kernel for the memory-efficient backend: its child fails, the run goes on and says so
    assert all("No viable backend" in rows["efficient", layout]["error"] for layout in ("flux-single", "contiguous"))
    assert "efficient  flux-single        failed" in result.stdout


@pytest.mark.parametrize("layout", ["contiguous", "flux-double", "flux-single", "flux-single-fixed"])
def test_attention_layouts_keep_the_values_and_set_the_strides(layout) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from attention_backends import in_layout
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    base = [torch.randn(1, 3, 7, 4) for _ in range(4)]
    out = in_layout(layout, *base)
    assert all(torch.equal(a, b) for a, b in zip(base, out, strict=True))
    q, grad = out[0], out[3]
    tokens_major = (7 * 3 * 4, 4, 3 * 4, 1)
    assert q.stride() == ((7 * 4 * 3, 7 * 4, 4, 1) if layout == "contiguous" else tokens_major)
    expected = {"contiguous": (84, 28, 4, 1), "flux-double": tokens_major,
                "flux-single": (7 * 5 * 12, 4, 5 * 12, 1), "flux-single-fixed": tokens_major}[layout]
    assert grad.stride() == expected


def _benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _kernel_sass():
    return _benchmark("kernel_sass")


# The shape of inductor's wrapper code that kernel_sass.py reads (torch 2.13): kernels defined by
# async_compile.triton, launched by .run with their element counts last, sizes as symbols.
_WRAPPER = """
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    pass
''', device_str='cpu')
triton_red_fused_amax_1 = async_compile.triton('triton_red_fused_amax_1', '''
@triton.jit
def triton_red_fused_amax_1(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr, R0_BLOCK : tl.constexpr):
    pass
''', device_str='cpu')
def call(self, args):
        triton_poi_fused_add_0_xnumel = 3072*s31
        triton_poi_fused_add_0.run(buf0, buf1, triton_poi_fused_add_0_xnumel, stream=raw_streamNone)
        triton_red_fused_amax_1.run(buf1, buf2, s31, 3072, stream=raw_streamNone)
        triton_poi_fused_add_0.run(buf2, buf3, 16, stream=raw_streamNone)
# hint: s31 4608
"""


def test_kernel_sass_reads_each_kernels_elements_from_the_wrapper() -> None:
    kernel_sass = _kernel_sass()
    assert set(kernel_sass.kernel_sources(_WRAPPER)) == {"triton_poi_fused_add_0", "triton_red_fused_amax_1"}
    assert kernel_sass.call_elements(_WRAPPER) == {
        "triton_poi_fused_add_0": (3072 * 4608 + 16, 2),  # two launches, summed
        "triton_red_fused_amax_1": (4608 * 3072, 1),  # rows x reduction length
    }


def test_kernel_launches_counts_extern_calls_and_operators_called_by_name() -> None:
    call = _WRAPPER + """\
        extern_kernels.mm(buf0, buf1, out=buf2)
        buf3 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf2, buf2, buf2)
        torch.ops.coatflux.lora_addmm_.default(buf2, buf4, buf5, 1.0)
"""
    assert _benchmark("kernel_launches")._count(call) == (3, 3)


def test_kernel_sass_counts_the_longest_loop() -> None:
    kernel_sass = _kernel_sass()
    listing = [(0x00, "MOV R1, c[0x0][0x28]"), (0x10, "S2R R0, SR_TID.X"),
               (0x20, "LDG.E R2, desc[UR4][R4.64]"), (0x30, "FMUL R2, R2, R2"),
               (0x40, "@P1 BRA 0x30"),  # an inner loop: 0x30..0x40
               (0x50, "IADD3 R4, R4, 0x1, RZ"),
               (0x60, "@P0 BRA 0x20"),  # the outer loop: 0x20..0x60
               (0x70, "EXIT")]
    assert [address for address, _ in kernel_sass._loop_body(listing)] == [0x20, 0x30, 0x40, 0x50, 0x60]
    assert kernel_sass._loop_body([(0x00, "BRA 0x10"), (0x10, "EXIT")]) is None  # forward branches only


def test_kernel_sass_compiles_with_inductors_alignment_hints() -> None:
    """Triton is given what inductor gives it on a GPU: the hints, and the block sizes as constants."""
    from types import SimpleNamespace

    hints = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    meta = {"signature": {"in_ptr0": "*bf16", "out_ptr0": "*fp8e4nv", "xnumel": "i32", "XBLOCK": "constexpr"},
            "constants": {}, "configs": [hints]}
    tuner = SimpleNamespace(fn=SimpleNamespace(arg_names=["in_ptr0", "out_ptr0", "xnumel", "XBLOCK"]),
                            triton_meta=meta)
    arguments = _kernel_sass().source_arguments(tuner, SimpleNamespace(kwargs={"XBLOCK": 128}))
    assert arguments["attrs"] == hints
    assert arguments["constexprs"] == {(3,): 128}
    assert arguments["signature"]["XBLOCK"] == "constexpr" and arguments["signature"]["in_ptr0"] == "*bf16"


def test_kernel_sass_replaces_only_coat_options_it_knows() -> None:
    import argparse

    kernel_sass = _kernel_sass()
    parser = argparse.ArgumentParser()
    assert kernel_sass._coat_options(["realize_opcount_threshold=30"], parser) == {"realize_opcount_threshold": 30}
    assert kernel_sass._coat_options([], parser) == {}
    for bad in ("max_autotune=1", "realize_opcount_threshold", "realize_opcount_threshold=3.5"):
        with pytest.raises(SystemExit):
            kernel_sass._coat_options([bad], parser)


def test_scale_fusion_times_every_formulation_and_checks_their_codes(tmp_path) -> None:
    out = tmp_path / "scale_fusion.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale_fusion.py"), "--device", "cpu", "--tokens", "16",
         "--width", "512", "--wide", "640", "--repeats", "1", "--chunks", "256", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bf16", "coat-row", "coat-chunk-256"}
    for name in ("coat-row", "coat-chunk-256"):
        assert rows[name]["ms"] > 0
        assert 20 < rows[name]["sqnr_db"] < 40  # E5M2 codes of the gradient: about 25 dB, not exact


def test_pow2_formulations_checks_each_formulation(tmp_path) -> None:
    out = tmp_path / "pow2.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pow2_formulations.py"), "--device", "cpu", "--small",
         "--tokens", "16", "--width", "512", "--wide", "640", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["formulation"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"product", "bits", "exp2"}
    for row in rows.values():  # each is exact on this CPU, and inductor's CPU code compiles each
        assert (row["pow2"], row["quantizer"], row["gelu_backward"]) == ("ok", "ok", "ok"), row
        assert row["gelu_backward_ms"] > 0


def test_pow2_formulation_swap_is_undone() -> None:
    from coatflux.kernels import quant

    pow2_formulations = _benchmark("pow2_formulations")

    library = quant._pow2
    with pow2_formulations.formulation(pow2_formulations.pow2_from_bits):
        assert quant._pow2 is pow2_formulations.pow2_from_bits
        k = torch.arange(-127, 128, dtype=torch.int32)
        assert torch.equal(quant._pow2(k), torch.exp2(k.double()).float())
    assert quant._pow2 is library


def test_fp8_accumulation_covers_every_flux_gemm_shape_both_ways(tmp_path) -> None:
    out = tmp_path / "accumulation.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fp8_accumulation.py"), "--device", "cpu", "--width", "32",
         "--resolution", "64", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # 9 shapes: 3 double-block image, 3 double-block text, 3 single-block; each forward and input grad
    assert len(report["rows"]) == 18
    assert sum(row["per_step"] for row in report["rows"]) == 2 * (19 * 12 + 38 * 5)  # FP8 linears per step
    for row in report["rows"]:
        assert row["ms_precise"] > 0 and row["ms_fast"] > 0
        assert row["sqnr_precise"] > 40 and row["sqnr_fast"] > 40  # against the fp32 product of the FP8 operands
    assert "per step:" in result.stdout


def test_optimizer_step_counts_the_eager_update() -> None:
    script = _benchmark("optimizer_step")
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in ((16, 300), (300, 16), (16, 40)):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen)
        params.append(p)
    ops, moved = script.count_eager(params)
    # Decode two moments, update, encode two: well over a hundred operations, each over the buffers.
    assert ops > 100
    padded = (16 * 300 * 2 + 128) * 4  # fp32 bytes of one flat buffer (each tensor padded to 128)
    assert moved > ops * padded / 4
