"""The portable compile cache: what one process compiled, another finds; bad files are named, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from coatflux.core.compile_cache import load_compile_cache, save_compile_cache

SCRIPT = textwrap.dedent("""
    import sys, torch
    from coatflux.core.compile_cache import compile_cache_counts, load_compile_cache, save_compile_cache
    print(load_compile_cache(sys.argv[1]))
    torch.compile(lambda x: x.sin() * 3, backend="inductor")(torch.randn(8))
    torch.compile(lambda x: x.cos() - 1, backend="inductor")(torch.randn(8))
    print(save_compile_cache(sys.argv[1]))
    print("counts", *compile_cache_counts())
""")


def test_a_fresh_process_finds_every_graph_another_compiled(tmp_path):
    """Two graphs compiled and saved once: a process with an empty inductor cache finds both (in
    torch 2.13 a second save in the first process would have kept only its own graphs)."""
    path = tmp_path / "cache" / "compile.bin"
    runs = []
    for i in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}")}  # empty each time
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True,
                             timeout=300, check=True)
        runs.append(out.stdout.strip().splitlines())
    first, second = runs
    assert first[0].endswith("no file yet, everything compiles")
    assert "artifacts saved" in first[1] and path.is_file()
    assert first[2] == "counts 0 2"  # nothing found, both compiled
    assert "artifacts loaded" in second[0]
    assert second[2] == "counts 2 0"  # both found, nothing compiled


def test_an_unreadable_file_is_named_and_kept(tmp_path, caplog):
    path = tmp_path / "compile.bin"
    path.write_bytes(b"not a cache")
    assert load_compile_cache(path) == f"compile cache {path}: unreadable (11 bytes), not used"
    assert str(path) in caplog.text
    # nothing compiled in this process: the file stays as it was
    assert save_compile_cache(path).endswith("nothing compiled in this run, file left as it was")
    assert path.read_bytes() == b"not a cache"


def test_bench_notes_what_the_cache_did(tmp_path):
    from coatflux.bench.__main__ import main

    js, cache = tmp_path / "bench.json", tmp_path / "compile.bin"
    cache.write_bytes(b"damaged")
    assert main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--resolutions", "32", "--configs", "bf16",
                 "--no-max-batch-search", "--compile-cache", str(cache), "--json", str(js)]) == 0
    notes = json.loads(js.read_text())["notes"]
    assert f"compile cache {cache}: unreadable (7 bytes), not used" in notes
    assert any(n.startswith("inductor graphs: 0 found in the cache, 0 compiled; compile cache") for n in notes)
    assert cache.read_bytes() == b"damaged"

