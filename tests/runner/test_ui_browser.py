"""``runner ui`` in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver (never a driver or browser fetched from the network), against a real
server and supervisor that run real workflows in real sandboxes.

The operator opens the URL ``runner ui`` printed, sees the run and its tasks, follows a link
to a task's log and reads it, and watches a running task's log grow (the live tail). Text
that workflow code controls (task output, task errors, a definition file's error naming a
hostile workflow id) holding ``<script>`` shows up as that text, and runs nothing.

A screenshot of each page is kept under ``$PRIVSEP_TEST_ARTIFACTS`` (default
``test-artifacts/`` at the repository's root).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from stack import Stack, running_stack
from ui_kit import start_ui

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(
    os.environ.get("PRIVSEP_TEST_ARTIFACTS")
    or Path(__file__).resolve().parents[2] / "test-artifacts"
)

# Each would set a flag on ``window`` if the page ran it as markup.
HOSTILE_OUTPUT = "<script>window.pwnedLog = 1</script>"
HOSTILE_ERROR = "<script>window.pwnedError = 1</script>"
HOSTILE_TAIL = "<img src=x onerror=window.pwnedTail=1><script>window.pwnedTail = 1</script>"
HOSTILE_ID = "<script>window.pwnedParse=1</script>"
FLAGS = ("pwnedLog", "pwnedError", "pwnedTail", "pwnedParse")

SHOWN = textwrap.dedent(f"""
    from privsep.client import Context, Workflow

    wf = Workflow("shown", schedule=None)

    @wf.task
    def greet(ctx: Context) -> str:
        print("hello from the greet task", flush=True)
        print({HOSTILE_OUTPUT!r}, flush=True)
        return "ok"

    @wf.task(upstream=[greet])
    def explode(ctx: Context) -> None:
        raise RuntimeError({HOSTILE_ERROR!r})
""")

TAILED = textwrap.dedent(f"""
    import time

    from privsep.client import Context, Workflow

    wf = Workflow("tailed", schedule=None)

    @wf.task
    def slow(ctx: Context) -> None:
        print("first line, before the page opens", flush=True)
        time.sleep(8)
        print({HOSTILE_TAIL!r}, flush=True)
        print("last line, after the page opened", flush=True)
""")

# A definition file whose workflow id is markup: the parse fails, and its error names it.
HOSTILE = f'from privsep.client import Workflow\n\nwf = Workflow("{HOSTILE_ID}")\n'


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack("ub-", uid_first=238_000) as s:
        (s.home / "workflows" / "shown.py").write_text(SHOWN)
        (s.home / "workflows" / "tailed.py").write_text(TAILED)
        (s.home / "workflows" / "hostile.py").write_text(HOSTILE)
        s.start("supervisor", "supervisor")
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    # Selenium Manager would look for a driver on the network; it is told not to, and is
    # given Debian's browser and driver so it has nothing to look for.
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root, where Chromium's own sandbox cannot start
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def signed_in(stack: Stack, browser: WebDriver) -> WebDriver:
    """The browser after opening the printed URL once: it holds the page's cookie."""
    url = start_ui(stack)
    browser.get(url)
    assert "token" not in browser.current_url, "the token stays in the address bar"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Runs"
    return browser


def screenshot(browser: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / f"ui-{name}.png"))


def no_script_ran(browser: WebDriver) -> None:
    for flag in FLAGS:
        assert browser.execute_script(f"return window.{flag};") is None, flag
    sources = [
        s.get_attribute("src") or "inline" for s in browser.find_elements(By.TAG_NAME, "script")
    ]
    assert all(src.endswith("/static/tail.js") for src in sources), sources
    assert browser.find_elements(By.TAG_NAME, "img") == []


def origin(browser: WebDriver) -> str:
    return "/".join(browser.current_url.split("/")[:3])


def finished(stack: Stack, workflow: str) -> str:
    run_id = stack.trigger_when_parsed(workflow, 90)
    stack.wait_for(lambda: stack.run_state(run_id) in ("success", "failed"), 120, "the run")
    return run_id


def test_runs_tasks_and_a_log_in_the_browser(stack: Stack, signed_in: WebDriver) -> None:
    browser = signed_in
    run_id = finished(stack, "shown")
    browser.get(origin(browser) + "/runs")
    runs = browser.find_element(By.ID, "runs")
    assert run_id in runs.text and "shown" in runs.text and "failed" in runs.text
    screenshot(browser, "runs")

    runs.find_element(By.LINK_TEXT, run_id).click()
    tasks = browser.find_element(By.ID, "tasks")
    rows = {
        row.find_elements(By.TAG_NAME, "td")[0].text: [
            td.text for td in row.find_elements(By.TAG_NAME, "td")
        ]
        for row in tasks.find_elements(By.CSS_SELECTOR, "tbody tr")
    }
    assert rows["greet"][1:3] == ["success", "1"]
    assert rows["explode"][1] == "failed"
    # The task's error is shown as the text it is.
    assert rows["explode"][5] == f"RuntimeError: {HOSTILE_ERROR}"
    no_script_ran(browser)
    screenshot(browser, "run")

    tasks.find_element(By.XPATH, ".//tr[td[1]='greet']//a[text()='try 1']").click()
    assert browser.find_elements(By.ID, "log"), browser.find_element(By.TAG_NAME, "main").text
    log = browser.find_element(By.ID, "log")
    WebDriverWait(browser, 10).until(
        lambda b: b.find_element(By.ID, "log-state").text == "complete"
    )
    assert "hello from the greet task" in log.text
    assert HOSTILE_OUTPUT in log.text
    no_script_ran(browser)
    screenshot(browser, "log")


def test_the_log_of_a_running_task_grows_in_the_page(stack: Stack, signed_in: WebDriver) -> None:
    browser = signed_in
    run_id = stack.trigger_when_parsed("tailed", 90)

    def running_attempt() -> Any:
        attempts = stack.attempts(run_id)
        return next((a for a in attempts if a["state"] == "running"), None)

    attempt = stack.wait_for(running_attempt, 60, "the slow task to start")

    def first_line_shipped() -> bool:
        resp = stack.operator("GET", f"/v1/operator/attempts/{attempt['id']}/log")
        return resp.status_code == 200 and "first line" in "".join(
            c["text"] for c in resp.json()["chunks"]
        )

    stack.wait_for(first_line_shipped, 30, "the first line to reach the server")
    browser.get(f"{origin(browser)}/attempts/{attempt['id']}/log?run={run_id}")
    log = browser.find_element(By.ID, "log")
    assert "first line" in log.text and "last line" not in log.text
    assert browser.find_element(By.ID, "log-state").text != "complete"
    # The live tail adds what the task writes next, without a reload.
    WebDriverWait(browser, 60).until(lambda b: "last line" in log.text)
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "log-state").text == "complete"
    )
    assert HOSTILE_TAIL in log.text
    no_script_ran(browser)
    screenshot(browser, "tail")


def test_definition_file_errors_supervisors_and_refusals(
    stack: Stack, signed_in: WebDriver
) -> None:
    browser = signed_in

    def hostile_error() -> bool:
        browser.get(origin(browser) + "/workflows")
        return HOSTILE_ID in browser.find_element(By.TAG_NAME, "main").text

    stack.wait_for(hostile_error, 60, "the hostile file's parse error")
    workflows = browser.find_element(By.ID, "workflows").text
    assert "shown" in workflows and "tailed" in workflows
    errors = browser.find_element(By.ID, "parse-errors")
    assert "hostile.py" in errors.text
    no_script_ran(browser)
    screenshot(browser, "workflows")

    browser.get(origin(browser) + "/supervisors")
    row = browser.find_element(By.XPATH, "//table[@id='supervisors']//tr[td[1]='sup-test']")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1].endswith(")") and "ago" in cells[1] and "stale" not in cells[1]
    assert cells[2] == "up to date"
    screenshot(browser, "supervisors")

    # A refusal to see: a request without a session.
    assert stack.operator("GET", "/v1/operator/runs").status_code == 200
    import requests

    assert requests.get(stack.url + "/v1/operator/workflows", timeout=10).status_code == 401
    browser.get(origin(browser) + "/refusals")
    refusals = browser.find_element(By.ID, "refusals").text
    assert "/v1/operator/workflows" in refusals and "401" in refusals
    screenshot(browser, "refusals")


def test_a_supervisor_whose_discovery_fails_shows_as_failing_to_sync(
    stack: Stack, signed_in: WebDriver
) -> None:
    browser = signed_in
    manifest = stack.home / "workflows" / "manifest.json"

    def discovery_cells() -> list[str]:
        browser.get(origin(browser) + "/supervisors")
        row = browser.find_element(By.XPATH, "//table[@id='supervisors']//tr[td[1]='sup-test']")
        return [td.text for td in row.find_elements(By.TAG_NAME, "td")][2:4]

    stack.wait_for(lambda: discovery_cells()[0] == "up to date", 30, "discovery up to date")
    # A malformed manifest fails every scan (and deletes nothing): the next heartbeat says so.
    manifest.write_text('{"workflows": {"shown": <script>window.pwnedParse=1</script>')
    try:
        stack.wait_for(
            lambda: discovery_cells()[0] == "failing to sync", 30, "discovery to be failing"
        )
        error = discovery_cells()[1]
        assert "manifest.json" in error, error
        no_script_ran(browser)
        screenshot(browser, "supervisors-failing")
    finally:
        manifest.unlink()
    stack.wait_for(lambda: discovery_cells() == ["up to date", ""], 30, "discovery to recover")
