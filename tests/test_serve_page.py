"""The chat page at `/` in headless Chromium: streaming replies, and model output is never executed.

The XSS test needs the *model* to reply with `<script>...`; a random tiny model will not, so that test
(and only that one) serves `ScriptedEngine`, a test-only fake that implements the engine's step API
and replies with a fixed text a few characters per step. Everything else is the real engine.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from browser import headless_chromium
from protege.chat import ChatFormat
from protege.engine import Completion, Engine, SamplingParams, StepOutput
from protege.serve import background_server, create_app

XSS_REPLY = ('Look: <script>window.__pwned = 1; alert(1)</script> and <img src=x onerror="window.__pwned = 2"> '
             'and [x](javascript:window.__pwned=3) **bold** `<b>code</b>`')


class ScriptedEngine:
    """Test-only fake engine (see module docstring): same step API, fixed reply."""

    def __init__(self, tokenizer: Any, reply: str, chars_per_step: int = 4, delay: float = 0.01):
        self.chat_format = ChatFormat.from_tokenizer(tokenizer)
        self.reply, self.chars, self.delay = reply, chars_per_step, delay
        self.max_batch_size = 4
        self._ids = itertools.count(1)
        self._pos: dict[int, tuple[int, int]] = {}  # request id -> (chars sent, prompt tokens)

    def add_request(self, prompt_ids: list[int], params: Any) -> int:
        rid = next(self._ids)
        self._pos[rid] = (0, len(prompt_ids))
        return rid

    def cancel(self, rid: int) -> None:
        self._pos.pop(rid, None)

    def has_pending(self) -> bool:
        return bool(self._pos)

    def step(self) -> list[StepOutput]:
        time.sleep(self.delay)
        outs = []
        for rid, (pos, n_prompt) in list(self._pos.items()):
            delta = self.reply[pos:pos + self.chars]
            pos += len(delta)
            done = None
            if pos >= len(self.reply):
                done = Completion(self.reply, [], n_prompt, pos // self.chars, "stop")
                del self._pos[rid]
            else:
                self._pos[rid] = (pos, n_prompt)
            outs.append(StepOutput(rid, [0], delta, done))
        return outs


class PacedEngine(Engine):
    """The real engine at one decode step per 30 ms, so the page visibly receives the reply in pieces."""

    def step(self):  # type: ignore[override]
        time.sleep(0.03)
        return super().step()


def _send(driver: Any, url: str, text: str, temperature: str = "0", max_tokens: str = "40") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model-name").text)
    driver.execute_script(
        "document.getElementById('temperature').value = arguments[0];"
        "document.getElementById('max-tokens').value = arguments[1];", temperature, max_tokens)
    driver.find_element(By.ID, "system").send_keys("Be brief.")
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


def _watch_reply(driver: Any, timeout: float = 60) -> tuple[str, list[int]]:
    """Poll the assistant bubble until done; returns (final raw text, distinct lengths seen while streaming)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw, done = driver.execute_script(
            "var el = document.querySelector('.message.assistant');"
            "return el ? [el.dataset.raw || '', el.dataset.done === '1'] : ['', false];")
        if done:
            return raw, seen
        if raw and (not seen or seen[-1] != len(raw)):
            seen.append(len(raw))
        time.sleep(0.005)
    raise AssertionError("the reply never finished on the page")


def test_page_streams_the_engines_reply(tiny_llama):
    model, tok = tiny_llama
    ref = Engine(model, tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]
    expected = ref.generate([ref.chat_format.encode_prompt(messages)], SamplingParams(max_new_tokens=40))[0].text
    app = create_app(PacedEngine(model, tok), "tiny-llama")
    with background_server(app) as url, headless_chromium() as driver:
        _send(driver, url, "Tell me about the sea.")
        raw, seen = _watch_reply(driver)
        assert raw == expected
        assert len(seen) >= 2, f"text did not arrive in pieces: {seen}"  # streamed, not all at once
        user_text = driver.execute_script("return document.querySelector('.message.user').textContent")
        assert user_text == "Tell me about the sea."


def test_model_html_is_shown_as_text_and_never_runs(tiny_llama):
    from selenium.common.exceptions import NoAlertPresentException

    app = create_app(ScriptedEngine(tiny_llama[1], XSS_REPLY), "scripted")
    with background_server(app) as url, headless_chromium() as driver:
        _send(driver, url, "say something dangerous")
        raw, _ = _watch_reply(driver)
        assert raw == XSS_REPLY
        time.sleep(0.3)  # give an injected handler (img onerror) the chance to fire
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 — raises when no alert is open
        assert driver.execute_script("return window.__pwned") is None
        bubble = "document.querySelector('.message.assistant')"
        text = driver.execute_script(f"return {bubble}.textContent")
        assert "<script>window.__pwned = 1; alert(1)</script>" in text
        assert '<img src=x onerror="window.__pwned = 2">' in text
        assert driver.execute_script(f"return {bubble}.querySelectorAll('script, img, a').length") == 0
        assert driver.execute_script(f"return {bubble}.querySelector('strong').textContent") == "bold"
        assert driver.execute_script(f"return {bubble}.querySelector('code').textContent") == "<b>code</b>"
        # The conversation continues: a second turn sends the first exchange as history.
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "input").send_keys("again")
        driver.find_element(By.ID, "send").click()
        deadline = time.monotonic() + 30
        while driver.execute_script("return document.querySelectorAll('.message.assistant[data-done]').length") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".message.user")) == 2
        assert app.state.scheduler.stats.finished == 2


def test_stop_button_aborts_and_frees_the_slot(tiny_llama):
    from selenium.webdriver.common.by import By

    long_reply = "word " * 400
    app = create_app(ScriptedEngine(tiny_llama[1], long_reply, chars_per_step=5, delay=0.02), "scripted")
    scheduler = app.state.scheduler
    with background_server(app) as url, headless_chromium() as driver:
        _send(driver, url, "talk for a while")
        deadline = time.monotonic() + 30
        while not driver.execute_script("var el = document.querySelector('.message.assistant');"
                                        "return el && el.dataset.raw;"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        driver.find_element(By.ID, "stop").click()
        raw, _ = _watch_reply(driver)
        assert raw and long_reply.startswith(raw) and len(raw) < len(long_reply)
        while scheduler.stats.cancelled < 1 or scheduler.stats.active:
            assert time.monotonic() < deadline, "the aborted request still holds its slot"
            time.sleep(0.02)
        assert scheduler.stats.finished == 0
        assert driver.find_element(By.ID, "send").is_enabled()
