"""The voice-chat page (`/`) in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium)
whose fake microphone plays examples/question.wav: the page must capture it, the server's VAD must hear the
question, and the page must receive and play the answer, show its transcript and log no console error.

Saves a screenshot to figures/voice_chat.png (shown in docs/realtime.md).
"""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

selenium = pytest.importorskip("selenium")
pytest.importorskip("silero_vad")
sf = pytest.importorskip("soundfile")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from openchroma.processing_chroma import load_audio  # noqa: E402
from openchroma.serving.app import ChromaEngine, ServerSettings, VoiceStore, create_app, register_voice_file  # noqa: E402
from openchroma.testing import build_tiny_model, build_tiny_processor  # noqa: E402
from test_server import Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = build_tiny_model(), build_tiny_processor()
    voices = VoiceStore(tmp_path_factory.mktemp("voices"))
    examples = REPO / "examples"
    register_voice_file(model, processor, voices, "default", examples / "voice.wav", examples / "voice.txt")
    settings = ServerSettings(model_name="chroma-tiny", default_voice="default", default_max_frames=25)
    with Server(create_app(ChromaEngine(model, processor, batch_window_s=0.0), settings, voices)) as running:
        yield running
    torch.set_num_threads(threads)


@pytest.fixture
def microphone(tmp_path) -> str:
    """The fake microphone's file: examples/question.wav between silences (Chromium loops it)."""
    wave = load_audio(str(REPO / "examples" / "question.wav"), 24000)
    silence = np.zeros(24000, np.float32)
    path = tmp_path / "microphone.wav"
    sf.write(path, np.concatenate([silence, wave, silence, silence, silence]), 24000, subtype="PCM_16")
    return str(path)


@pytest.fixture
def browser(microphone):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={microphone}",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1100,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition: str, timeout: float = 180):
    """Poll a JavaScript expression until it is truthy; -> window.chromaStats."""
    deadline = time.time() + timeout
    while True:
        stats = driver.execute_script("return window.chromaStats")
        if driver.execute_script(f"return Boolean({condition})"):
            return stats
        assert time.time() < deadline, f"timed out waiting for {condition}: {stats}"
        time.sleep(0.25)


def test_voice_chat_page_talks_with_a_fake_microphone(server, browser):
    browser.get(server.url + "/")
    wait_for(browser, "document.getElementById('voice').options.length > 0", 60)
    assert browser.find_element(By.ID, "voice").get_attribute("value") == "default"
    browser.find_element(By.ID, "start").click()
    stats = wait_for(browser, "window.chromaStats.speechStopped >= 1 && window.chromaStats.samplesPlayed >= 24000 "
                              "&& [...document.querySelectorAll('.turn.assistant .text')].some(t => t.textContent)")
    assert stats["speechStarted"] >= 1 and stats["responses"] >= 1
    assert stats["samplesReceived"] >= stats["samplesPlayed"] > 0  # played in the page's audio worklet
    assert stats["latencyMs"] is not None and stats["latencyMs"] > 0
    assert browser.find_element(By.ID, "latency").text.endswith("ms")
    assert browser.find_element(By.CSS_SELECTOR, ".turn.user").text.startswith("You")
    assert any(turn.text for turn in browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .text"))
    assert not stats["errors"]
    time.sleep(0.5)
    (REPO / "figures").mkdir(exist_ok=True)
    browser.save_screenshot(str(REPO / "figures" / "voice_chat.png"))
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not problems, problems
    browser.find_element(By.ID, "stop").click()
