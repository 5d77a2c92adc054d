# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Decode-speed benchmark: per-frame time against the hardware floor, time to first audio, batching, memory.

    python benchmarks/bench_decode.py --sizes tiny mid --device cpu --threads tiny=1 mid=2 --compile tiny
    python benchmarks/bench_decode.py --sizes full --device cuda --dtype bfloat16
    python benchmarks/bench_decode.py --load-test            # peak RAM of from_pretrained, full size, bf16

Sizes: tiny = ChromaConfig.tiny() (the golden fixture's sizes); mid = the real backbone (16 x 2048) and depth decoder
(4 x 1024) and the real Mimi, thinker cut to 2 text and 2 audio-encoder layers; full = the real configuration
(tests/fixtures/config_real.json). All random weights; generation is forced to a fixed number of frames (the EOS
code is disabled and the thinker reads a fixed long text, so it runs every second frame throughout).

floor = the bare component forwards of one frame, timed in the same process: one backbone step (1 position, cache
as long as the run's), the 7 depth-decoder steps, and half a thinker text step. Each size runs in its own process
(clean peak-RSS numbers); results are appended to benchmarks/RESULTS.md and plotted to figures/.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FRAME_SECONDS = 0.08


# ----------------------------------------------------------------------------------------------------------------------
# model and inputs
# ----------------------------------------------------------------------------------------------------------------------


def build_config(size):
    from openchroma import ChromaConfig

    if size == "tiny":
        return ChromaConfig.tiny()
    real = json.loads((ROOT / "tests" / "fixtures" / "config_real.json").read_text())
    if size == "mid":
        real["thinker_config"]["text_config"]["num_hidden_layers"] = 2
        real["thinker_config"]["text_config"]["layer_types"] = ["full_attention"] * 2
        real["thinker_config"]["audio_config"]["encoder_layers"] = 2
        real["thinker_config"]["audio_config"]["num_hidden_layers"] = 2
    return ChromaConfig(**real)


def build_model(size, device, dtype):
    from openchroma import ChromaForConditionalGeneration

    config = build_config(size)
    config.codebook_eos_token_id = -1  # never stop: timing needs a fixed number of frames
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in their final dtype (no float32 copy of a 6 B model)
    try:
        with torch.device(device):
            model = ChromaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(model, batch, question_seconds=3.0, voice_seconds=3.0, seed=0):
    """A chat-shaped thinker prompt with `question_seconds` of audio and a reference voice, without a tokenizer."""
    from transformers import WhisperFeatureExtractor

    g = np.random.default_rng(seed)
    thinker = model.config.thinker_config
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
    wave16 = (0.1 * g.standard_normal(int(16000 * question_seconds))).astype(np.float32)
    mel = features(wave16, sampling_rate=16000, return_tensors="pt", padding="longest", return_attention_mask=True)
    frames = int(mel["attention_mask"].sum())
    n_audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ordinary = lambda n: g.integers(0, 1000, n).tolist()  # noqa: E731
    ids = ([thinker.bos_token_id] + ordinary(20) + [thinker.eos_token_id, thinker.bos_token_id] + ordinary(2)
           + [thinker.audio_start_token_id] + [thinker.audio_token_index] * n_audio + [thinker.audio_end_token_id]
           + [thinker.eos_token_id, thinker.bos_token_id] + ordinary(2))
    t = np.arange(int(24000 * voice_seconds)) / 24000
    voice = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * g.standard_normal(t.shape)).astype(np.float32)
    device = model.backbone_device_dtype()[0]
    return {
        "thinker_input_ids": torch.tensor([ids] * batch, device=device),
        "thinker_attention_mask": torch.ones(batch, len(ids), dtype=torch.long, device=device),
        "thinker_input_features": mel["input_features"].repeat(batch, 1, 1).to(device),
        "thinker_feature_attention_mask": mel["attention_mask"].repeat(batch, 1).to(device),
        "input_ids": torch.tensor([ordinary(20)] * batch, device=device),
        "attention_mask": torch.ones(batch, 20, dtype=torch.long, device=device),
        "input_values": torch.from_numpy(voice)[None, None].repeat(batch, 1, 1).to(device),
        "input_values_cutoffs": torch.full((batch,), len(voice), device=device),
    }


def long_text(batch, frames):
    return [torch.arange(100, 100 + frames // 2 + 4)] * batch


# ----------------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_stream(model, inputs, frames, decode_audio=True, runner=None, **kwargs):
    """-> (seconds to the first chunk, seconds per frame after it, frames). `runner`: a ChromaGenerator to use
    (e.g. a compiled one, kept across calls) instead of `model.stream`."""
    device = model.backbone_device_dtype()[0]
    forced = long_text(inputs["thinker_input_ids"].shape[0], frames)
    if runner is None:
        chunks = model.stream(**inputs, max_new_tokens=frames, decode_audio=decode_audio, chunk_frames=(2, 4, 8),
                              forced_text_ids=forced, **kwargs)
    else:
        checked = model.prepare_generation_inputs(**inputs, forced_text_ids=forced)
        chunks = runner.stream(checked, frames, decode_audio=decode_audio, chunk_frames=(2, 4, 8))
    sync(device)
    start = time.perf_counter()
    first = None
    count = 0
    for chunk in chunks:
        count += chunk.audio_codes.shape[1]
        if first is None:
            sync(device)
            first, first_frames = time.perf_counter() - start, count
    sync(device)
    total = time.perf_counter() - start
    return first, (total - first) / max(count - first_frames, 1), count


def floor_per_frame(model, frames, repeats):
    """Bare forwards of one frame: backbone step, K-1 depth steps, half a thinker step (medians of `repeats`)."""
    from openchroma.cache_chroma import ChromaKVCache, padding_causal_mask

    config = model.config
    device, dtype = model.backbone_device_dtype()
    length = 120 + frames * 2  # a cache as long as the run's (prompt + frames + thinker pairs)
    bb = ChromaKVCache(config.backbone_config, 1, length + 1, device, dtype)
    x = torch.randn(1, 1, config.backbone_config.hidden_size, device=device, dtype=dtype)
    valid = torch.ones(1, length + 1, dtype=torch.bool, device=device)
    mask = padding_causal_mask(valid, 1)
    pos = torch.full((1, 1), length, device=device)
    depth = ChromaKVCache(config.decoder_config, 1, config.audio_num_codebooks, device, dtype)
    d_in = torch.randn(1, 1, config.decoder_config.audio_embedding_dim, device=device, dtype=dtype)
    d2 = torch.randn(1, 2, config.decoder_config.audio_embedding_dim, device=device, dtype=dtype)
    thinker = model.thinker_decoder()
    t_layers = len(thinker.text_model.layers)
    t_len = 200 + frames
    kv = torch.zeros(1, thinker.num_kv_heads, t_len, thinker.head_dim, device=device, dtype=dtype)
    from openchroma.modeling_chroma import ChromaThinkerCache

    def backbone():
        model.backbone(x, pos, mask, bb, length)

    from openchroma import ChromaGenerator

    cos, sin = ChromaGenerator(model, static_thinker=False).depth_rope(d2)  # the positions table generation uses

    def depth_steps():
        h = model.decoder(d2, None, None, depth, 0, rope=(cos[:, :2], sin[:, :2]))
        model.decoder.codebook_logits(h[:, -1], 1)
        for k in range(2, config.audio_num_codebooks):
            h = model.decoder(d_in, None, None, depth, k, rope=(cos[:, k:k + 1], sin[:, k:k + 1]))
            model.decoder.codebook_logits(h[:, -1], k)

    t_cache = ChromaThinkerCache([kv.clone() for _ in range(t_layers)], [kv.clone() for _ in range(t_layers)],
                                 torch.ones(1, t_len, dtype=torch.bool, device=device), t_len - 1)
    t_ids, t_pos = torch.tensor([5], device=device), torch.tensor([t_len - 1], device=device)
    t_valid = torch.tensor([True], device=device)

    def thinker_step():
        t_cache.length = t_len - 1  # rewrite the last slot every time
        thinker.step(t_cache, t_ids, t_pos, t_valid)

    def median_time(fn):
        times = []
        with torch.no_grad():
            fn()
            for _ in range(repeats):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    parts = {"backbone": median_time(backbone), "depth": median_time(depth_steps), "thinker": median_time(thinker_step)}
    parts["floor"] = parts["backbone"] + parts["depth"] + parts["thinker"] / config.audio_frames_per_text_token
    return parts


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def median_runs(runs, fn):
    """Run fn() `runs` times -> the element-wise median of its tuples (this machine's timings are noisy)."""
    results = [fn() for _ in range(runs)]
    return tuple(statistics.median(column) for column in zip(*results))


def worker(size, device_name, dtype_name, frames, repeats, compile_step=False, runs=3):
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_model(size, device, dtype)
    build_s = time.perf_counter() - t
    result = {"size": size, "device": device_name, "dtype": dtype_name, "frames": frames, "build_s": build_s,
              "threads": torch.get_num_threads(),
              "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    inputs = make_inputs(model, 1)
    timed_stream(model, inputs, frames)  # warm-up (a first run is slower: allocator, thread pool, page faults)
    ttfa, per_frame_audio, n = median_runs(runs, lambda: timed_stream(model, inputs, frames))
    result.update(ttfa_s=ttfa, per_frame_s=per_frame_audio, rtf=per_frame_audio / FRAME_SECONDS, runs=runs)
    # steady per-frame time and the floor, measured alternately so that both see the same machine state; the ratio is
    # the median of the per-run ratios
    code_times, floors = [], []
    for _ in range(runs):
        code_times.append(timed_stream(model, inputs, frames, decode_audio=False)[1])
        floors.append(floor_per_frame(model, frames, repeats))
    per_frame_codes = statistics.median(code_times)
    result["per_frame_no_decode_s"] = per_frame_codes
    result.update({f"floor_{k}_s": statistics.median(f[k] for f in floors) for k in floors[0]})
    ratios = [t / f["floor"] for t, f in zip(code_times, floors)]
    result.update(per_frame_over_floor=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    voice = model.encode_voice(inputs["input_values"][0, 0], inputs["input_ids"][0])
    thinker_only = {k: v for k, v in inputs.items() if k.startswith("thinker_")}
    timed_stream(model, thinker_only, 2, voice=voice)  # computes and keeps the voice's prefix KV
    result["ttfa_cached_voice_s"] = median_runs(runs, lambda: timed_stream(model, thinker_only, 4, voice=voice))[0]
    batch = 8
    inputs8 = make_inputs(model, batch)
    timed_stream(model, inputs8, min(frames, 4), decode_audio=False)  # warm-up
    _, per_step8, _ = median_runs(runs, lambda: timed_stream(model, inputs8, frames, decode_audio=False))
    result["fps_b1"] = 1 / per_frame_codes
    result["fps_b8"] = batch / per_step8
    result["b8_over_b1"] = result["fps_b8"] / result["fps_b1"]
    if compile_step:
        from openchroma import ChromaGenerator

        runner = ChromaGenerator(model, compile=True)
        t = time.perf_counter()
        timed_stream(model, inputs, frames, decode_audio=False, runner=runner)  # compiles (two graphs)
        result["compile_s"] = time.perf_counter() - t
        result["per_frame_compiled_s"] = median_runs(
            runs, lambda: timed_stream(model, inputs, frames, decode_audio=False, runner=runner))[1]
    result["peak_rss_gib"] = peak_rss_gib()
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result))


def load_worker(folder, dtype_name):
    """Peak RSS while loading a saved full-size checkpoint, against the bytes of the weights it ends up holding."""
    from openchroma import ChromaForConditionalGeneration

    before = peak_rss_gib()
    t = time.perf_counter()
    model = ChromaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - t
    # safetensors tensors may still be lazily mapped from the file: touch every 4 KiB page so they count in RSS
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            flat = tensor.detach().reshape(-1)
            step = max(1, 4096 // tensor.element_size())
            flat[::step].float().sum().item()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    result = {"load_s": seconds, "weights_gib": weight_bytes / 2**30, "rss_before_gib": before,
              "peak_rss_gib": peak_rss_gib(), "vision_params": sum(1 for n, _ in model.named_parameters() if "visual" in n)}
    result["peak_over_weights"] = (result["peak_rss_gib"] - before) / result["weights_gib"]
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    for field in ("RssAnon", "RssFile"):
        match = [line for line in status.splitlines() if line.startswith(field)]
        if match:
            result[field] = int(match[0].split()[1]) / 2**20  # GiB
    print("RESULT " + json.dumps(result))


def save_full_checkpoint(folder, dtype_name):
    """A random full-size checkpoint in the published layout (vision tower included, as the real file has it)."""
    from openchroma import ChromaForConditionalGeneration

    config = build_config("full")
    config.load_vision_tower = True
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype_name))
    try:
        model = ChromaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.load_vision_tower = False  # what users load
    model.save_pretrained(folder)
    print("RESULT " + json.dumps({"saved": str(folder)}))


# ----------------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------------


def run_child(args):
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine_description(device, results=()):
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = ", ".join(f"{r['size']} {r['threads']}" for r in results if "threads" in r) or "default"
    threads = f"threads: {threads}"
    return (f"{datetime.date.today()} · {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({threads}), transformers {transformers.__version__}, device {device}")


def ratio_text(r):
    if "ratio_min" not in r:
        return f"{r['per_frame_over_floor']:.2f}"
    return f"{r['per_frame_over_floor']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"


def write_results(results, load, device, path):
    lines = [f"\n## {machine_description(device, results)}\n"]
    if results:
        lines += [
            "| size | dtype | params (B) | s/frame (codes) | floor s/frame | ratio | s/frame (+audio) | RTF | "
            "first audio (s) | first audio, cached voice (s) | frames/s b1 | frames/s b8 | b8/b1 | peak RAM GiB | "
            "s/frame compiled |" + (" peak GPU GiB |" if device == "cuda" else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if device == "cuda" else ""),
        ]
        for r in results:
            row = (f"| {r['size']} | {r['dtype']} | {r['params_b']:.2f} | {r['per_frame_no_decode_s']:.4f} | "
                   f"{r['floor_floor_s']:.4f} | {ratio_text(r)} | {r['per_frame_s']:.4f} | "
                   f"{r['rtf']:.2f} | {r['ttfa_s']:.3f} | {r['ttfa_cached_voice_s']:.3f} | {r['fps_b1']:.1f} | "
                   f"{r['fps_b8']:.1f} | {r['b8_over_b1']:.2f} | {r['peak_rss_gib']:.2f} | "
                   + (f"{r['per_frame_compiled_s']:.4f} (compile {r['compile_s']:.0f} s) |"
                      if "per_frame_compiled_s" in r else "– |"))
            if device == "cuda":
                row += f" {r.get('peak_gpu_gib', 0):.2f} |"
            lines.append(row)
        lines.append("")
        lines.append("Floor parts (s): " + "; ".join(
            f"{r['size']}: backbone {r['floor_backbone_s']:.4f}, depth x7 {r['floor_depth_s']:.4f}, "
            f"thinker step {r['floor_thinker_s']:.4f}" for r in results))
        frames = ", ".join(f"{r['size']} {r['frames']}" for r in results)
        lines.append(f"Frames per run: {frames}; medians of {results[0].get('runs', 1)} runs (ratio: "
                     "median of the per-run ratios, range in brackets; each run times the frames, then the floor).")
    if load:
        lines.append(f"\nLoading the full-size model (random weights saved in the published layout with the vision "
                     f"tower, {load['dtype']}): peak RSS {load['peak_rss_gib']:.2f} GiB over {load['rss_before_gib']:.2f} "
                     f"GiB before, weights {load['weights_gib']:.2f} GiB → {load['peak_over_weights']:.3f}x the weight "
                     f"bytes (after touching every weight page; RSS anon {load.get('RssAnon', 0):.2f} GiB, file-backed "
                     f"{load.get('RssFile', 0):.2f} GiB); vision parameters allocated: {load['vision_params']}; "
                     f"{load['load_s']:.1f} s.")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [f"{r['size']}\n{r['device']} {r['dtype']}" for r in results]
    x = np.arange(len(results))
    ax.bar(x - 0.27, [r["per_frame_no_decode_s"] * 1e3 for r in results], 0.27, label="per frame, eager (codes)")
    ax.bar(x, [r.get("per_frame_compiled_s", np.nan) * 1e3 for r in results], 0.27, label="per frame, compiled step")
    ax.bar(x + 0.27, [r["floor_floor_s"] * 1e3 for r in results], 0.27, label="floor (bare eager forwards)")
    ax.axhline(FRAME_SECONDS * 1e3, color="red", linestyle="--", label="real time (80 ms)")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("ms per 80 ms frame")
    ax.set_title("Chroma decode speed vs floor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_threads(items):
    """["2"] -> {size: 2 for every size}; ["tiny=1", "mid=2"] -> per size."""
    threads = {}
    for item in items:
        size, _, count = item.rpartition("=")
        for name in ([size] if size else ["tiny", "mid", "full"]):
            threads[name] = int(count)
    return threads


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mid"], choices=["tiny", "mid", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--frames", type=int, default=None, help="frames per timed run (default by size)")
    parser.add_argument("--repeats", type=int, default=20, help="timings per floor component (median)")
    parser.add_argument("--runs", type=int, default=3, help="timed generations per measurement (median)")
    parser.add_argument("--load-test", action="store_true", help="also measure from_pretrained peak RAM at full size")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--plot", default=str(ROOT / "figures" / "decode_speed.png"))
    parser.add_argument("--compile", nargs="*", default=None, metavar="SIZE",
                        help="also time the torch.compile'd one-frame step (for the given sizes; none given: all)")
    parser.add_argument("--threads", nargs="*", default=[],
                        help="torch threads: N for every size, or SIZE=N each (e.g. tiny=1 mid=2; default torch's)")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--save-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = parse_threads(args.threads)
    if args.worker and threads.get(args.worker[0]):
        torch.set_num_threads(threads[args.worker[0]])
    if args.worker:
        size, device, dtype, frames, repeats, compile_step, runs = args.worker
        return worker(size, device, dtype, int(frames), int(repeats), compile_step == "1", int(runs))
    if args.load_worker:
        return load_worker(*args.load_worker)
    if args.save_worker:
        return save_full_checkpoint(*args.save_worker)

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    default_frames = {"tiny": 200, "mid": 24, "full": 24 if args.device == "cuda" else 6}
    compiled = set(args.sizes if args.compile == [] else args.compile or [])
    results = []
    for size in args.sizes:
        frames = args.frames or default_frames[size]
        size_dtype = "bfloat16" if size == "full" and args.dtype is None else dtype
        print(f"running {size} ({args.device}, {size_dtype}, {frames} frames) ...", file=sys.stderr)
        child = ["--worker", size, args.device, size_dtype, str(frames), str(args.repeats), str(int(size in compiled)),
                 str(args.runs)]
        if threads.get(size):
            child = ["--threads", str(threads[size])] + child
        results.append(run_child(child))
        print(json.dumps(results[-1], indent=1), file=sys.stderr)
    load = None
    if args.load_test:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
            print("saving a random full-size bf16 checkpoint ...", file=sys.stderr)
            run_child(["--save-worker", folder, "bfloat16"])
            print("loading it ...", file=sys.stderr)
            load = run_child(["--load-worker", folder, "bfloat16"])
            load["dtype"] = "bfloat16"
            print(json.dumps(load, indent=1), file=sys.stderr)
    write_results(results, load, args.device, args.results)
    if results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
