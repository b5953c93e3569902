"""The chat page `llama-sparsek serve` serves, used as a person would: headless Chromium opens it,
types a question, sends it, and the answer that appears is the model's.

Chromium is driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so neither a websocket client nor
a driver is needed. Runs only where Chromium is installed (`apt-get install chromium`);
LLAMA_SPARSEK_SCREENSHOT=FILE.png keeps a screenshot of the answered page.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import ok, serve

from llama_sparsek import SparseK, tools

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed"),
]


def _above(fd: int, lowest: int) -> int:
    """`fd` moved to a descriptor number >= `lowest` (the old one closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return moved


class DevTools:
    """Chromium, headless, and its DevTools protocol over a pipe."""

    def __init__(self, exe: str, profile: Path, size: tuple[int, int] = (1100, 800)) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child's ends above 4, so that moving them to 3 and 4 never overwrites one
        to_browser_r, from_browser_w = (_above(fd, 10) for fd in (to_browser_r, from_browser_w))
        args = [
            exe,
            "--headless=new",
            "--no-sandbox",  # tests run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            "about:blank",
        ]
        # the protocol's fixed descriptors: 3 reads our commands, 4 carries the answers
        script = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, "chromium", *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=(profile.parent / "chromium.log").open("wb"),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for message in messages:
                    decoded = json.loads(message)
                    if "id" in decoded:  # events (no id) are not needed here
                        self._answers.put(decoded)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._answers.get(timeout=60)
            if answer["id"] == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result

    def close(self) -> None:
        os.close(self._to_browser)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Page:
    def __init__(self, browser: DevTools, url: str) -> None:
        self.browser = browser
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.call(method, self.session, **params)

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {expression}")

    def type_and_enter(self, text: str) -> None:
        self.call("Input.insertText", text=text)
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.call("Input.dispatchKeyEvent", type="keyUp", **key)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    assert CHROMIUM is not None
    chromium = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        yield chromium
    finally:
        chromium.close()


def test_the_chat_page_answers_a_question(
    smollm2_path: Path, tmp_path: Path, browser: DevTools
) -> None:
    assert tools.ui_dir() is not None, "this install has no chat page"
    question = "What is the capital of France?"
    # greedy by default: the page sends no sampling settings of its own
    extra = ["--temp", "0", "--n-predict", "32"]
    with serve(tmp_path, smollm2_path, SparseK(), ctx=2048, threads=1, extra=extra) as url:
        page = Page(browser, url)
        page.wait_for("!!document.querySelector('textarea')")
        time.sleep(2)  # the page wires up its input after the textarea first shows
        before = page.js("document.body.innerText")
        page.js("document.querySelector('textarea').focus()")
        page.type_and_enter(question)
        page.wait_for(f"document.body.innerText.includes({json.dumps(question)})")
        # the answer is complete when the page text stops changing and the server is idle
        last, stable_since = "", time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = page.js("document.body.innerText")
            idle = all(not s["is_processing"] for s in ok(f"{url}/slots"))
            if text != last:
                last, stable_since = text, time.monotonic()
            elif idle and time.monotonic() - stable_since > 2:
                break
            time.sleep(0.25)
        # after the page, from scratch: a reused prompt would end in a smaller batch, which the
        # CPU kernels round differently, and SmolLM2's greedy answer is sensitive to that
        expected = ok(
            f"{url}/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 32,
                "cache_prompt": False,
            },
        )["choices"][0]["message"]["content"]
        shot = os.environ.get("LLAMA_SPARSEK_SCREENSHOT")
        page.screenshot(Path(shot) if shot else tmp_path / "chat.png")
    assert last != before
    first_line = expected.strip().splitlines()[0]
    assert first_line in last, f"{first_line!r} not on the page:\n{last}"
