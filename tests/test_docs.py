"""Docs are code: every ```python / ```bash / ```sh block of README.md and docs/*.md runs, one pytest case per block
(named FILE:LINE), against a tiny checkpoint folder written by `openchroma.testing.save_tiny_checkpoint`.

What the harness does to a block before running it (and nothing else):
- the model id `FlashLabs/Chroma-4B` becomes the tiny folder (named `Chroma-4B`, so a server serves `chroma-4b`);
- `device_map="auto"` / `device_map="cuda"` are dropped, then `"cuda"` becomes `"cpu"`;
- `torch.bfloat16` becomes `torch.float32`.

Where it runs: one temporary folder per documentation file, holding a copy of examples/. The python blocks of one file
run in order in one interpreter (later blocks see earlier variables; running a single block runs the earlier ones
first). Each bash/sh block runs in `bash -e`, with this interpreter's bin folder first on PATH (`python`,
`openchroma`, `pip` are the test environment's).

Markers, on the line right before a block:
- `<!-- docs-test: server -->`: the block runs while `openchroma serve --model TINY_FOLDER --register-voice default
  examples/voice.wav examples/voice.txt --default-max-frames 50` listens on http://localhost:8000 (started once per
  test session; served model name `chroma-4b`).
- `<!-- docs-test: skip REASON -->`: not run here (install commands that CI runs in fresh environments, downloads);
  the block must still parse (`bash -n` / `compile`) and the test is reported as skipped with REASON.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLE_FILES = ("question.wav", "voice.wav", "voice.txt")
MODEL_ID = "FlashLabs/Chroma-4B"
SERVER_PORT = 8000
SERVER_VOICE = "default"
SERVER_DEFAULT_FRAMES = 50  # the tiny model never stops: requests that set no length get 4 s of audio, not 80 s
BLOCK_TIMEOUT_S = 600
SERVER_START_TIMEOUT_S = 180

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(server|skip)\b\s*(.*?)\s*-->\s*$")
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str  # "python" or "bash"
    code: str
    marker: str | None  # "server", "skip" or None
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path` whose language is python, bash or sh, with the marker on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start, language = index, opening.group(1)
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            index += 1
        if index == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: code block never closed")
        if language in RUNNABLE:
            previous = lines[start - 1] if start > 0 else ""
            marker = MARKER.match(previous.strip())
            blocks.append(Block(path, start + 1, RUNNABLE[language], "\n".join(lines[start + 1 : index]) + "\n",
                                marker.group(1) if marker else None, marker.group(2) if marker else ""))
        index += 1
    return blocks


def substitute(code: str, tiny_folder: str) -> str:
    """The documented substitutions, and only those (see the module docstring)."""
    code = code.replace(MODEL_ID, tiny_folder)
    code = re.sub(r",\s*device_map=[\"'](auto|cuda)[\"']", "", code)
    code = re.sub(r"device_map=[\"'](auto|cuda)[\"']\s*,\s*", "", code)
    code = code.replace('"cuda"', '"cpu"').replace("'cuda'", "'cpu'")
    return code.replace("torch.bfloat16", "torch.float32")


ALL_BLOCKS = [block for path in DOC_FILES for block in extract_blocks(path)]


# ----------------------------------------------------------------------------------------------------------------------
# Where blocks run
# ----------------------------------------------------------------------------------------------------------------------


def block_env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def docs_root():
    root = Path(tempfile.mkdtemp(prefix="openchroma-docs-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_folder(docs_root) -> str:
    """A complete tiny checkpoint (weights, config, processor, hub files), written in a fresh interpreter."""
    folder = docs_root / "checkpoints" / "Chroma-4B"
    script = "import sys; from openchroma.testing import save_tiny_checkpoint; save_tiny_checkpoint(sys.argv[1])"
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True, env=block_env(), timeout=300)
    return str(folder)


WORKDIRS: dict = {}


def workdir(docs_root: Path, doc: Path) -> Path:
    """The temporary folder of one documentation file (shared by its blocks), with a copy of examples/."""
    if doc not in WORKDIRS:
        folder = docs_root / "work" / str(doc.relative_to(REPO)).replace("/", "_")
        (folder / "examples").mkdir(parents=True)
        for name in EXAMPLE_FILES:
            shutil.copy(REPO / "examples" / name, folder / "examples" / name)
        WORKDIRS[doc] = folder
    return WORKDIRS[doc]


WORKER = textwrap.dedent(
    """
    import json, os, sys, traceback
    protocol = os.fdopen(os.dup(1), "w")           # results go to the harness on the original stdout
    log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1); os.dup2(log, 2)               # everything the blocks print goes to the log file
    import torch
    torch.set_num_threads(1)
    namespace = {"__name__": "__main__"}
    for request in sys.stdin:
        path = request.strip()
        try:
            exec(compile(open(path).read(), path, "exec"), namespace)
            result = {"ok": True}
        except BaseException:
            result = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.flush(); sys.stderr.flush()
        protocol.write(json.dumps(result) + "\\n"); protocol.flush()
    """
)


class PythonSession:
    """One interpreter per documentation file: blocks are exec'd in order in one namespace."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.log = folder / "python-blocks.log"
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(self.log)], cwd=folder, env=block_env(), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.done: set = set()

    def run(self, block: Block, code: str) -> None:
        import json

        script = self.folder / f"block_{block.line}.py"
        script.write_text(code)
        start = self.log.stat().st_size if self.log.exists() else 0
        self.process.stdin.write(f"{script}\n")
        self.process.stdin.flush()
        reply = read_line(self.process, BLOCK_TIMEOUT_S)
        self.done.add(block.line)
        if reply is None:
            self.close()
            pytest.fail(f"{block.name}: the interpreter died or the block ran over {BLOCK_TIMEOUT_S} s\n"
                        f"{self.output_since(start)}", pytrace=False)
        result = json.loads(reply)
        if not result["ok"]:
            pytest.fail(f"{block.name} failed:\n{result['error']}\n--- output ---\n{self.output_since(start)}",
                        pytrace=False)

    def output_since(self, start: int) -> str:
        return self.log.read_bytes()[start:].decode(errors="replace")[-6000:] if self.log.exists() else ""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def read_line(process, timeout_s: float):
    """The next line the worker writes, or None when it dies or stays silent for `timeout_s`."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    ready = selector.select(timeout_s)
    selector.close()
    if not ready:
        return None
    line = process.stdout.readline()
    return line or None


SESSIONS: dict = {}


@pytest.fixture(scope="session")
def python_sessions():
    yield SESSIONS
    for session in SESSIONS.values():
        session.close()
    SESSIONS.clear()


# ----------------------------------------------------------------------------------------------------------------------
# The server of `<!-- docs-test: server -->` blocks
# ----------------------------------------------------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def docs_server(docs_root, tiny_folder):
    """`openchroma serve` on the tiny folder with the example voice as `default`, on localhost:8000."""
    if port_in_use(SERVER_PORT):
        pytest.fail(f"port {SERVER_PORT} is taken: the server blocks need it free", pytrace=False)
    folder = docs_root / "server"
    folder.mkdir()
    log = open(folder / "server.log", "wb")
    command = [
        sys.executable, "-m", "openchroma.cli", "serve", "--model", tiny_folder, "--port", str(SERVER_PORT),
        "--register-voice", SERVER_VOICE, str(REPO / "examples" / "voice.wav"), str(REPO / "examples" / "voice.txt"),
        "--voices-dir", str(folder / "voices"), "--device", "cpu", "--torch-threads", "1",
        "--default-max-frames", str(SERVER_DEFAULT_FRAMES),
    ]
    process = subprocess.Popen(command, cwd=folder, env=block_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not server_healthy():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("openchroma serve did not come up:\n"
                            + (folder / "server.log").read_text(errors="replace")[-4000:], pytrace=False)
            time.sleep(0.5)
        yield f"http://localhost:{SERVER_PORT}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def server_healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{SERVER_PORT}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------------------------


def run_bash(block: Block, code: str, folder: Path) -> None:
    result = subprocess.run(["bash", "-e", "-c", code], cwd=folder, env=block_env(), capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"{block.name} exited with {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n"
                    f"--- stderr ---\n{result.stderr[-6000:]}", pytrace=False)


def check_syntax(block: Block) -> None:
    if block.language == "python":
        compile(block.code, block.name, "exec")
    else:
        result = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True)
        assert result.returncode == 0, f"{block.name}: {result.stderr}"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[block.name for block in ALL_BLOCKS])
def test_doc_block(block, request, docs_root, tiny_folder, python_sessions):
    if block.marker == "skip":
        check_syntax(block)
        pytest.skip(f"docs-test: skip {block.reason}")
    if block.marker == "server":
        request.getfixturevalue("docs_server")
    folder = workdir(docs_root, block.path)
    code = substitute(block.code, tiny_folder)
    if block.language == "bash":
        run_bash(block, code, folder)
        return
    session = python_sessions.get(block.path)
    if session is None:
        session = python_sessions[block.path] = PythonSession(folder)
    for earlier in ALL_BLOCKS:  # a block selected alone sees what the earlier python blocks of its file define
        if (earlier.path == block.path and earlier.language == "python" and earlier.line < block.line
                and earlier.line not in session.done and earlier.marker != "skip"):
            if earlier.marker == "server":
                request.getfixturevalue("docs_server")
            session.run(earlier, substitute(earlier.code, tiny_folder))
    session.run(block, code)


def test_every_doc_file_is_collected_and_markers_are_attached():
    """The harness sees README.md and every docs/*.md; a docs-test marker not followed by a runnable block (a typo,
    or a marker before a ```text block) is an error rather than a silently untested block."""
    assert DOC_FILES[0].name == "README.md" and (REPO / "docs" / "finetuning.md") in DOC_FILES
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines[:-1], start=1):
            if "docs-test" in line:
                assert MARKER.match(line.strip()), f"{path.name}:{number}: unknown marker {line!r}"
                following = FENCE.match(lines[number])
                assert following and following.group(1) in RUNNABLE, f"{path.name}:{number}: marker not before a block"


def test_substitutions():
    code = ('m = AutoModelForCausalLM.from_pretrained("FlashLabs/Chroma-4B", dtype=torch.bfloat16, '
            'device_map="auto")\nx = torch.ones(1, device="cuda")\n')
    assert substitute(code, "/tmp/Chroma-4B") == (
        'm = AutoModelForCausalLM.from_pretrained("/tmp/Chroma-4B", dtype=torch.float32)\n'
        'x = torch.ones(1, device="cpu")\n')
