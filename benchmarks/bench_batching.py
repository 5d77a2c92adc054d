# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The server's continuous batching under staggered arrivals: aggregate frames/s and time to first audio.

    python benchmarks/bench_batching.py --requests 16 --gap-ms 20 --frames 40    # appends to benchmarks/RESULTS.md

Drives `ChromaEngine` in-process (no HTTP) on the tiny random model: `--requests` chat requests, one every
`--gap-ms`, each answering `--frames` audio frames. Compared with the same requests one at a time (each waits for the
previous one). Numbers are for the engine loop; the model is tiny, so they show scheduling, not GPU arithmetic.
"""

import argparse
import datetime
import statistics
import threading
import time

import torch

from results_file import RESULTS, append_section


def make_job(engine, processor, voice, frames, index, done):
    from openchroma.sampling_chroma import SamplingParams
    from openchroma.serving.engine import GenerationJob

    conversation = [{"role": "user", "content": [{"type": "text", "text": f"Question number {index}?"}]}]
    inputs = processor(conversation)
    thinker_inputs = {k: v for k, v in inputs.items() if k.startswith("thinker_")}
    record = {"submitted": None, "first_audio": None, "frames": 0}

    def sink(event):
        if event[0] == "delta" and event[2] is not None and len(event[2]) and record["first_audio"] is None:
            record["first_audio"] = time.perf_counter()
        if event[0] in ("done", "error"):
            record["frames"] = event[2] if event[0] == "done" else 0
            record["error"] = event if event[0] == "error" else None
            done.release()

    job = GenerationJob(kind="chat", thinker_inputs=thinker_inputs, sink=sink, voice=voice, max_frames=frames,
                        sampling=SamplingParams(do_sample=True, temperature=0.8), seed=index)
    return job, record


def run(engine, processor, voice, requests, gap_s, frames, one_at_a_time):
    done = threading.Semaphore(0)
    records = []
    start = time.perf_counter()
    for i in range(requests):
        job, record = make_job(engine, processor, voice, frames, i, done)
        record["submitted"] = time.perf_counter()
        engine.submit(job)
        records.append(record)
        if one_at_a_time:
            done.acquire()
        else:
            time.sleep(gap_s)
    if not one_at_a_time:
        for _ in range(requests):
            done.acquire()
    wall = time.perf_counter() - start
    errors = [r["error"] for r in records if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    total_frames = sum(r["frames"] for r in records)
    ttfa = [r["first_audio"] - r["submitted"] for r in records]
    return {"wall_s": wall, "frames": total_frames, "fps": total_frames / wall, "ttfa_median_s": statistics.median(ttfa),
            "ttfa_max_s": max(ttfa)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from openchroma.serving.engine import ChromaEngine
    from openchroma.testing import build_tiny_model, build_tiny_processor

    model = build_tiny_model(0)
    model.config.codebook_eos_token_id = -1  # answers run their full length (random weights hit EOS at random)
    processor = build_tiny_processor()
    t = torch.arange(24000 * 2) / 24000
    voice = model.encode_voice((0.3 * torch.sin(2 * torch.pi * 180 * t))[None], torch.arange(5, 25))
    engine = ChromaEngine(model, processor, max_batch_size=16, batch_window_s=0.0)
    engine.start()
    try:
        run(engine, processor, voice, 2, 0.0, 4, True)  # warm-up
        alone = run(engine, processor, voice, args.requests, 0.0, args.frames, True)
        together = run(engine, processor, voice, args.requests, args.gap_ms / 1000, args.frames, False)
        joined = engine.metrics["joined_running_total"]
    finally:
        engine.stop()
    lines = [
        f"\n## {datetime.date.today()} · server engine, continuous batching (tiny model, CPU, torch {torch.__version__},"
        f" {args.threads} thread(s))\n",
        f"{args.requests} chat requests of {args.frames} frames each (sampled, seeded); staggered: one every "
        f"{args.gap_ms:g} ms ({joined} joins of a running batch in that run).\n",
        "| schedule | wall (s) | frames/s (all requests) | first audio, median (s) | first audio, worst (s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("one at a time", alone), ("staggered, continuous batching", together)):
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['fps']:.0f} | {r['ttfa_median_s']:.3f} | "
                     f"{r['ttfa_max_s']:.3f} |")
    append_section(args.results, lines)


if __name__ == "__main__":
    main()
