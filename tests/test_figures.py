"""The figures the README shows are drawn by scripts in the repository; they must keep running."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_architecture_figure_script_draws_a_png(tmp_path):
    output = tmp_path / "architecture.png"
    subprocess.run([sys.executable, str(REPO / "figures" / "architecture.py"), "--output", str(output)], check=True,
                   timeout=120)
    data = output.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_decode_speed_plot_draws_a_png_from_benchmark_results(tmp_path):
    """benchmarks/bench_decode.py draws figures/decode_speed.png from its result records (the benchmark itself is
    too slow for CI: its plotting step runs on two recorded-shape results)."""
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = [
        {"size": "tiny", "device": "cpu", "dtype": "float32", "per_frame_no_decode_s": 0.0065,
         "per_frame_compiled_s": 0.0023, "floor_floor_s": 0.002},
        {"size": "mid", "device": "cpu", "dtype": "float32", "per_frame_no_decode_s": 0.41, "floor_floor_s": 0.37},
    ]
    output = tmp_path / "decode_speed.png"
    bench.plot(results, output)
    assert output.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("name", ["architecture.png", "decode_speed.png", "voice_chat.png"])
def test_readme_shows_the_figures(name):
    assert (REPO / "figures" / name).is_file()
    assert f"](figures/{name})" in (REPO / "README.md").read_text()
