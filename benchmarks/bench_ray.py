# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The server on Ray Serve: aggregate frames/s and p95 time to first audio, 1 vs N replicas, concurrent streams.

    python benchmarks/bench_ray.py --replicas 1 2 --streams 8 16 --frames 40    # appends to benchmarks/RESULTS.md

Starts a local Ray cluster (`--cpus`, no dashboard) and Serve on a free port, deploys `serving/ray_app.py` with the
tiny random model (one torch thread per replica, `--cpus / replicas` CPUs each), and for every replica count and
stream count sends that many /v1/audio/speech requests at once (raw PCM, streamed; the default voice, so Ray
balances them over the replicas), each `--frames` audio frames long. Time to first audio: request sent -> first PCM
byte received. Frames/s: all frames / wall time of the round. Each configuration runs `--rounds` times after a
warm-up round; the table gives the median round. With `--gpus-per-replica 1` on a machine with GPUs it compares
1 vs N GPUs the same way (pass `--model` for a real checkpoint).
"""

import argparse
import asyncio
import datetime
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_file import RESULTS, append_section

REPO = Path(__file__).resolve().parents[1]
FRAME_BYTES = 1920 * 2  # one 80 ms frame of 24 kHz 16-bit PCM


async def one_stream(client, url, frames, index) -> dict:
    body = {"input": f"Stream number {index} is speaking now.", "response_format": "pcm", "max_audio_frames": frames,
            "seed": index, "temperature": 0.8}
    start = time.perf_counter()
    first, received = None, 0
    async with client.stream("POST", url + "/v1/audio/speech", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"stream {index}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        replica = response.headers.get("x-openchroma-replica")
        async for piece in response.aiter_raw():
            if piece and first is None:
                first = time.perf_counter() - start
            received += len(piece)
    return {"first_audio": first, "frames": received / FRAME_BYTES, "replica": replica}


async def one_round(url, streams, frames) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, frames, i) for i in range(streams)))
        wall = time.perf_counter() - start
    firsts = [r["first_audio"] for r in results]
    return {"wall": wall, "fps": sum(r["frames"] for r in results) / wall, "p95": float(np.percentile(firsts, 95)),
            "median": statistics.median(firsts), "replicas_used": len({r["replica"] for r in results})}


def deploy(replicas, args, voices_dir, port):
    from ray import serve

    from openchroma.serving.ray_app import APP_NAME, build_app

    options = {"replicas": replicas, "replica_cpus": args.cpus / replicas, "replica_gpus": args.gpus_per_replica,
               "torch_threads": args.threads, "voices_dir": voices_dir, "max_frames": max(args.frames, 100),
               "register_voice": [["default", str(REPO / "examples" / "voice.wav"),
                                   str(REPO / "examples" / "voice.txt")]]}
    if args.model:
        options["model"] = args.model
    serve.delete(APP_NAME)  # the previous configuration's replicas release their CPUs/GPUs first
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def measure(args):
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as voices_dir:
            for replicas in args.replicas:
                url = deploy(replicas, args, voices_dir, port)
                asyncio.run(one_round(url, 2 * replicas, 4))  # warm-up: every replica has run a request
                for streams in args.streams:
                    rounds = [asyncio.run(one_round(url, streams, args.frames)) for _ in range(args.rounds)]
                    best = sorted(rounds, key=lambda r: r["fps"])[len(rounds) // 2]
                    rows.append({"replicas": replicas, "streams": streams, **best,
                                 "fps_all": [round(r["fps"]) for r in rounds]})
                    print(rows[-1], file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def report(args, rows):
    import ray
    import torch

    device = f"{args.gpus_per_replica:g} GPU(s) per replica" if args.gpus_per_replica else "CPU"
    lines = [
        f"## {datetime.date.today()} · Ray Serve, 1 vs {max(args.replicas)} replicas "
        f"({args.model or 'tiny model'}, {device}, {args.threads} torch thread(s) per replica, "
        f"ray {ray.__version__}, torch {torch.__version__}, {os.cpu_count()} cores)",
        "",
        f"Concurrent /v1/audio/speech streams (raw PCM, sampled, default voice), {args.frames} frames each, through "
        f"the ingress; median of {args.rounds} round(s) by frames/s (all rounds' frames/s in the last column).",
        "",
        "| replicas | streams | frames/s (all streams) | first audio p95 (s) | first audio median (s) | "
        "replicas used | wall (s) | frames/s per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['streams']} | {r['fps']:.0f} | {r['p95']:.3f} | {r['median']:.3f} | "
                     f"{r['replicas_used']} | {r['wall']:.2f} | {', '.join(map(str, r['fps_all']))} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--frames", type=int, default=40, help="audio frames per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=2, help="CPUs of the local Ray cluster, split over replicas")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the local Ray cluster")
    parser.add_argument("--gpus-per-replica", type=float, default=0)
    parser.add_argument("--model", help="a Chroma checkpoint (default: the tiny random model)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    lines = report(args, measure(args))
    if args.no_save:
        print("\n".join(lines))
    else:
        append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
