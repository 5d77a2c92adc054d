# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Quantization benchmark: memory, speed and agreement with float32 greedy output per mode (docs/quantization.md).

    python benchmarks/bench_quantization.py --modes float32 bfloat16 int8 --frames 64 --seeds 0 1 2 --threads 2

Mid size on the CPU (benchmarks/bench_decode.py's "mid": the real backbone, depth decoder and Mimi, the thinker cut to
2 text and 2 audio-encoder layers; random weights, saved once as a float32 checkpoint and loaded from it by each mode,
as a user would). Per mode, in its own process: weight bytes (quantized tensors at their real size), peak RSS over the
process before loading (VmHWM: includes the checkpoint pages mapped while loading), RSS after generating, seconds per
frame (greedy, thinker text forced, EOS disabled, no audio decode; a 2-frame run's time subtracted to leave out the
prompt), and the codes and codebook-0 logits. Against
float32: the share of identical codes per codebook over seeds x frames, and the max |codebook-0 logit error| over
the frames before the first differing code (identical inputs there).

Full size: each mode's weight bytes computed on the meta device (no memory) from the real configuration with the
per-tensor byte counts of each format, and the same formula applied to the mid configuration, checked against the
bytes measured there. Results are appended to benchmarks/RESULTS.md, the figure goes to figures/quantization.png.
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_config, long_text, make_inputs  # noqa: E402
from results_file import RESULTS, append_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOGIT_FRAMES = 8  # codebook-0 logits kept per seed (the first frames)


# ----------------------------------------------------------------------------------------------------------------------
# one mode, in its own process
# ----------------------------------------------------------------------------------------------------------------------


def rss_gib(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load(folder, mode):
    from openchroma import ChromaForConditionalGeneration
    from openchroma.quantization import load_quantized

    if mode in ("float32", "bfloat16"):
        return ChromaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, mode)).eval()
    return load_quantized(folder, mode, "cpu", torch.float32)


def timed_generate(model, inputs, frames):
    """-> (seconds, output) of a greedy generation of `frames` frames with the thinker's text forced."""
    t = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=frames, forced_text_ids=long_text(1, frames),
                         return_dict_in_generate=True, output_logits=True)
    return time.perf_counter() - t, out


def touch_every_page(model):
    from openchroma.quantization import tensor_bytes

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor) in (torch.Tensor, nn.Parameter) and tensor_bytes(tensor):
                tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].float().sum().item()


def mode_worker(folder, mode, frames, seeds, out_path):
    from openchroma.quantization import weight_bytes

    before = rss_gib()
    t = time.perf_counter()
    model = load(folder, mode)
    load_s = time.perf_counter() - t
    model.config.codebook_eos_token_id = -1  # never stop: every seed gives `frames` frames
    codes, logits, seconds = [], [], []
    for seed in seeds:
        inputs = make_inputs(model, 1, seed=seed)
        if seed == seeds[0]:
            model.generate(**inputs, max_new_tokens=2, forced_text_ids=long_text(1, 2))  # warm-up
        short = timed_generate(model, inputs, 2)[0]  # the prompt's cost, subtracted below
        total, out = timed_generate(model, inputs, frames)
        seconds.append((total - short) / (frames - 2))
        codes.append(out.sequences[0].numpy())
        logits.append(torch.stack(out.logits[:LOGIT_FRAMES], dim=1)[0].float().numpy())
    np.savez(out_path, codes=np.stack(codes), logits=np.stack(logits))
    touch_every_page(model)  # weights mapped from the checkpoint count in RSS only once read
    result = {"mode": mode, "load_s": load_s, "weights_gib": weight_bytes(model) / 2**30,
              "codec_gib": weight_bytes(model, "codec_model.") / 2**30, "s_per_frame": float(np.median(seconds)),
              "peak_rss_gib": rss_gib("VmHWM") - before, "rss_after_gib": rss_gib() - before,
              "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result))


def prepare_checkpoint(folder):
    """The mid model with random weights (Mimi codebooks randomised as in openchroma.testing), saved in float32."""
    from openchroma import ChromaForConditionalGeneration
    from openchroma.testing import randomize_codebooks

    torch.manual_seed(0)
    model = ChromaForConditionalGeneration(build_config("mid")).eval()
    randomize_codebooks(model.codec_model)
    model.save_pretrained(folder)


def run_child(args, extra):
    command = [sys.executable, __file__, "--threads", str(args.threads), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


# ----------------------------------------------------------------------------------------------------------------------
# agreement
# ----------------------------------------------------------------------------------------------------------------------


def agreement(reference, other):
    """codes [S, T, K], logits [S, F, V] of float32 and of a mode -> share of identical codes per codebook [K],
    max |codebook-0 logit error| over the frames before each seed's first differing code, and those frame counts."""
    frames = min(reference["codes"].shape[1], other["codes"].shape[1])  # greedy: a shorter run is a prefix
    same = reference["codes"][:, :frames] == other["codes"][:, :frames]  # [S, T, K]
    per_codebook = same.mean(axis=(0, 1))
    errors, counts = [], []
    for s in range(same.shape[0]):
        differing = np.flatnonzero(~same[s].all(axis=-1))
        n = min(int(differing[0]) + 1 if len(differing) else same.shape[1], reference["logits"].shape[1])
        counts.append(n)  # the first differing frame still had identical inputs
        errors.append(np.abs(reference["logits"][s, :n] - other["logits"][s, :n]).max())
    scale = float(np.abs(reference["logits"]).max())
    return per_codebook, float(max(errors)), scale, counts


# ----------------------------------------------------------------------------------------------------------------------
# weight bytes per format, on the meta device
# ----------------------------------------------------------------------------------------------------------------------


def linear_bytes(mode, out_features, in_features, dtype_bytes):
    """Bytes of one quantized [out, in] weight in each format (data + scales)."""
    n = out_features * in_features
    if mode == "int8":  # torchao Int8Tensor: int8 data + one scale per output row in the load dtype
        return n + out_features * dtype_bytes
    if mode == "int4":  # tinygemm layout: 4-bit data + bfloat16 scale and zero per group of 128
        return n // 2 + out_features * (in_features // 128) * 2 * 2
    if mode == "bnb-8bit":  # int8 data + float32 row statistics
        return n + out_features * 4
    if mode == "bnb-4bit":  # NF4 data + 8-bit absmax per 64 values + float32 per 256 absmax (double quantization)
        return n // 2 + n // 64 + (n // 64 // 256 + 1) * 4
    raise ValueError(mode)


def estimated_bytes(config, mode, dtype_bytes):
    """Weight bytes of `mode` for `config`, counted on the meta device. Unquantized tensors take `dtype_bytes`, Mimi
    float32 (its default), quantized linears `linear_bytes`."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from openchroma import ChromaForConditionalGeneration
    from openchroma.quantization import modules_to_keep

    with torch.device("meta"):
        model = ChromaForConditionalGeneration(config)
    quantized = set()
    total = 0
    if mode not in ("float32", "bfloat16"):
        keep = modules_to_keep()
        for name, module in model.named_modules():
            if type(module) is nn.Linear and should_convert_module(name, keep):
                if mode != "int4" or module.in_features % 128 == 0:
                    quantized.add(id(module.weight))
                    total += linear_bytes(mode, module.out_features, module.in_features, dtype_bytes)
    seen = set(quantized)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            size = 4 if name.startswith("codec_model.") or not tensor.is_floating_point() else dtype_bytes
            total += tensor.numel() * (tensor.element_size() if not tensor.is_floating_point() else size)
    return total


def layer_times(threads, repeats=15):
    """Median ms of one mid backbone layer on one position (the decode step's shape) per format, the formats timed
    alternately so that all see the same machine load: a steadier speed comparison than whole runs on a busy CPU."""
    import copy
    import statistics

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from openchroma.modeling_chroma import ChromaDecoderLayer

    torch.set_num_threads(threads)
    config = build_config("mid").backbone_config
    torch.manual_seed(0)
    layers = {"float32": ChromaDecoderLayer(config, 0).eval()}
    layers["bfloat16"] = copy.deepcopy(layers["float32"]).to(torch.bfloat16)
    layers["int8"] = copy.deepcopy(layers["float32"])
    quantize_(layers["int8"], Int8WeightOnlyConfig())
    rope = torch.ones(1, 1, 1, config.head_dim), torch.zeros(1, 1, 1, config.head_dim)
    times = {name: [] for name in layers}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, layer in layers.items():
                dtype = torch.bfloat16 if name == "bfloat16" else torch.float32
                x = torch.randn(1, 1, config.hidden_size, dtype=dtype)
                t = time.perf_counter()
                layer(x, rope[0].to(dtype), rope[1].to(dtype), None)
                times[name].append(time.perf_counter() - t)
    return {name: 1000 * statistics.median(values[1:]) for name, values in times.items()}


FULL_MODES = [("float32", 4), ("bfloat16", 2), ("int8", 4), ("int8", 2), ("int4", 2), ("bnb-8bit", 2), ("bnb-4bit", 2)]


def memory_lines(measured):
    """Mid check (formula vs measured bytes) and the full-size table."""
    mid, full = build_config("mid"), build_config("full")
    lines = ["", "Weight bytes from the per-format formula on the meta device, against the mid bytes measured above:", "",
             "| mode | mid formula (GiB) | mid measured (GiB) | formula / measured |", "|---|---|---|---|"]
    for result in measured:
        dtype_bytes = 2 if result["mode"] == "bfloat16" else 4
        formula = estimated_bytes(mid, result["mode"], dtype_bytes) / 2**30
        lines.append(f"| {result['mode']} | {formula:.3f} | {result['weights_gib']:.3f} | "
                     f"{formula / result['weights_gib']:.4f} |")
    base = estimated_bytes(full, "bfloat16", 2)
    lines += ["", "Full size (tests/fixtures/config_real.json, vision tower not allocated), computed on the meta device "
              "(unquantized parts in the load dtype, Mimi float32):", "",
              "| mode | load dtype | weights (GiB) | vs bfloat16 |", "|---|---|---|---|"]
    estimates = []
    for mode, dtype_bytes in FULL_MODES:
        size = estimated_bytes(full, mode, dtype_bytes)
        estimates.append((mode, dtype_bytes, size / 2**30))
        dtype = {4: "float32", 2: "bfloat16"}[dtype_bytes]
        lines.append(f"| {mode} | {dtype} | {size / 2**30:.2f} | {size / base:.2f}x |")
    return lines, estimates


def plot(measured, agreements, estimates, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["mode"] for r in measured]
    axes[0].bar(names, [r["weights_gib"] for r in measured], label="weights")
    axes[0].bar(names, [r["peak_rss_gib"] - r["weights_gib"] for r in measured],
                bottom=[r["weights_gib"] for r in measured], alpha=0.4, label="peak RSS above weights")
    for i, r in enumerate(measured):
        axes[0].text(i, r["peak_rss_gib"], f"{r['s_per_frame']:.2f} s/frame", ha="center", va="bottom")
    axes[0].set(title="mid size, CPU: memory (GiB) and s/frame", ylabel="GiB")
    axes[0].legend()
    for mode, per_codebook in agreements.items():
        axes[1].plot(range(len(per_codebook)), per_codebook, marker="o", label=mode)
    axes[1].set(title="identical greedy codes vs float32", xlabel="codebook", ylabel="share", ylim=(0, 1.05))
    axes[1].legend()
    labels = [f"{m}\n({'bf16' if b == 2 else 'fp32'})" for m, b, _ in estimates]
    axes[2].bar(labels, [gib for _, _, gib in estimates])
    axes[2].set(title="full size: weights (GiB), meta-device count", ylabel="GiB")
    axes[2].tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def frame_counts(data):
    counts = sorted({d["codes"].shape[1] for d in data.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]} (float32 run: {counts[-1]}, its first frames compared)"


def report(args, measured, data):
    reference = data["float32"]
    lines = [f"## {datetime.date.today()} · quantization, mid size, CPU ({platform.processor() or platform.machine()}, "
             f"{measured[0]['threads']} threads), torch {torch.__version__}",
             "", f"Greedy, {len(args.seeds)} seeds x {frame_counts(data)} frames, thinker text forced, EOS disabled. "
             "Command: "
             f"`python benchmarks/bench_quantization.py --modes {' '.join(args.modes)} --frames {args.frames} "
             f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads}`", "",
             "| mode | weights (GiB) | peak RSS (GiB) | RSS after (GiB) | s/frame | identical codes cb0 / cb1-7 / all "
             "| max cb0 logit error (frames) |", "|---|---|---|---|---|---|---|"]
    agreements = {}
    for result in measured:
        per_codebook, error, scale, counts = agreement(reference, data[result["mode"]])
        agreements[result["mode"]] = per_codebook
        lines.append(
            f"| {result['mode']} | {result['weights_gib']:.2f} | {result['peak_rss_gib']:.2f} | "
            f"{result['rss_after_gib']:.2f} | {result['s_per_frame']:.3f} | {per_codebook[0]:.3f} / "
            f"{per_codebook[1:].mean():.3f} / {per_codebook.mean():.3f} | {error:.2e} of max {scale:.1f} "
            f"({'/'.join(map(str, counts))}) |")
    lines += ["", "Per codebook (0..7): " + "; ".join(
        f"{mode} " + " ".join(f"{x:.3f}" for x in per_codebook) for mode, per_codebook in agreements.items())]
    layer_ms = layer_times(args.threads)
    lines += ["", "One mid backbone layer on one position, medians of 15 alternating runs (ms): " + ", ".join(
        f"{name} {ms:.1f}" for name, ms in layer_ms.items())]
    memory, estimates = memory_lines(measured)
    figure = Path(args.figure).resolve()
    lines += memory + ["", f"Figure: `{figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure}`.", ""]
    plot(measured, agreements, estimates, Path(args.figure))
    append_section(args.results, lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default=str(Path(tempfile.gettempdir()) / "openchroma-bench-quant-mid"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--figure", default=str(ROOT / "figures" / "quantization.png"))
    parser.add_argument("--work-dir", help="keeps each mode's outputs; modes already there are not run again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.prepare:
        return prepare_checkpoint(args.checkpoint)
    if args.worker:
        return mode_worker(args.checkpoint, args.worker, args.frames, args.seeds, args.out)
    if args.modes[0] != "float32":
        parser.error("the first mode must be float32 (the reference)")
    if not (Path(args.checkpoint) / "config.json").exists():
        run_child(args, ["--prepare", "--checkpoint", args.checkpoint])
    measured, data = [], {}
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        out, result_path = work / f"{mode}.npz", work / f"{mode}.json"
        if not (out.exists() and result_path.exists()):  # a mode measured by an earlier run is reused
            result = run_child(args, ["--worker", mode, "--checkpoint", args.checkpoint, "--frames",
                                      str(args.frames), "--seeds", *map(str, args.seeds), "--out", str(out)])
            result_path.write_text(json.dumps(result))
        measured.append(json.loads(result_path.read_text()))
        data[mode] = dict(np.load(out))
        print("RESULT " + json.dumps(measured[-1]), flush=True)
    report(args, measured, data)


if __name__ == "__main__":
    main()
