# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The benchmarks' shared output: a markdown section printed and appended to benchmarks/RESULTS.md."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_section(path, lines):
    """Print the lines and append them to the results file at `path`."""
    text = "\n".join(lines) + "\n"
    print(text)
    with open(path, "a") as f:
        f.write(text)
