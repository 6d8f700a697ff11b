"""The HTML run report: one self-contained file with the DAG as SVG (layered by longest path),
a timeline of the steps (with the time a step waited for a pool slot), hover cards, and a check
in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from _pool_pipelines import contended

from flowcore import Client, PipelineRun, RunStatus, Stack, StepRun, StepStatus
from flowcore._models import ErrorInfo, StepRunConfig
from flowcore._report import (
    dag_edges,
    layers,
    max_parallelism,
    ordered_steps,
    render_report,
    write_report,
)
from flowcore._runview import STATUS_COLORS, format_duration, waited_noticeably

FLOWS = textwrap.dedent('''
    import time

    from flowcore import StepRetryConfig, get_step_context, pipeline, step


    @step
    def load() -> list[int]:
        return [1, 2, 3]


    @step(enable_cache=False)
    def left(data: list[int]) -> int:
        time.sleep(0.3)
        return sum(data)


    @step(enable_cache=False)
    def right(data: list[int]) -> int:
        time.sleep(0.3)
        return len(data)


    @step(enable_cache=False, retry=StepRetryConfig(max_retries=2, delay=0.1))
    def flaky(data: list[int]) -> int:
        if get_step_context().step_run.attempt < 3:
            raise ConnectionError("flaky service")
        return 1


    @step(enable_cache=False)
    def square(x: int) -> int:
        time.sleep(0.1)
        return x * x


    @step(enable_cache=False)
    def combine(values: list[int], a: int, b: int) -> int:
        return sum(values) + a + b


    @step(enable_cache=False)
    def explode(total: int) -> None:
        raise ValueError(f"total {total} is <too> big")


    @step(enable_cache=False)
    def never() -> None:
        pass


    @pipeline
    def picture() -> None:
        data = load()
        a = left(data)
        b = right(data)
        flaky(data)
        total = combine(square.map(data), a, b)
        explode(total)
        never(after="explode")
''')

STEPS = {"load", "left", "right", "flaky", "square", "square[0]", "square[1]", "square[2]",
         "combine", "explode", "never"}


@dataclass
class Stored:
    cwd: Path
    home: Path
    first: str
    second: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCORE_")}
        env["FLOWCORE_HOME"] = str(self.home)
        return subprocess.run([sys.executable, "-m", "flowcore.cli", *args], cwd=self.cwd,
                              env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    def run(self, name: str) -> PipelineRun:
        return Client(Stack.local(self.home)).get_pipeline_run(name)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    """Two runs of `picture` in a real store, made with `flowcore run` (the second one has
    `load` cached)."""
    cwd = tmp_path_factory.mktemp("report")
    (cwd / "report_flows.py").write_text(FLOWS)
    store = Stored(cwd, cwd / "home", "", "")
    names = []
    for _ in range(2):
        proc = store.cli("run", "report_flows:picture", "--quiet")
        assert proc.returncode == 1, proc
        names.append(proc.stdout.strip().splitlines()[-1].split()[1])
    store.first, store.second = names
    return store


class _Collect(HTMLParser):
    """Collects the data-step names inside the #dag and #timeline SVGs, and resource URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.svg: str | None = None
        self.steps: dict[str, list[str]] = {"dag": [], "timeline": []}
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svg = a.get("id")
        if self.svg in self.steps and "data-step" in a and tag == "g":
            self.steps[self.svg].append(a["data-step"] or "")
        for key in ("src", "href", "xlink:href"):
            if a.get(key):
                self.urls.append(a[key] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg = None


def test_report_command_writes_one_self_contained_file(stored: Stored, tmp_path: Path) -> None:
    """`flowcore runs report RUN -o FILE` writes a page that needs nothing from the network
    and draws every step in both the graph and the timeline."""
    target = tmp_path / "out" / "run.html"
    proc = stored.cli("runs", "report", stored.second, "-o", str(target))
    assert proc.returncode == 0 and proc.stdout == f"wrote {target}\n", proc
    page = target.read_text(encoding="utf-8")
    parsed = _Collect()
    parsed.feed(page)
    assert sorted(parsed.steps["dag"]) == sorted(STEPS)
    assert sorted(parsed.steps["timeline"]) == sorted(STEPS)
    assert all(u.startswith(("data:", "#", "url(#")) for u in parsed.urls), parsed.urls
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert "<too>" not in page and "&lt;too&gt;" in page  # user text is escaped
    default = stored.cli("runs", "report", stored.first)
    assert default.returncode == 0
    assert (stored.cwd / f"{stored.first}.html").is_file()


def test_layers_follow_the_longest_path_and_maps_gather(stored: Stored) -> None:
    """Each step's column is its longest path from a root; `.map()` elements sit between the
    mapped source and the gather node."""
    run = stored.run(stored.first)
    edges = dag_edges(run)
    assert edges is not None
    assert edges["square"] == ("square[0]", "square[1]", "square[2]")
    assert edges["square[1]"] == ("load",)
    assert set(edges["combine"]) == {"square", "left", "right"}
    assert layers(run) == {
        "load": 0, "left": 1, "right": 1, "flaky": 1, "square[0]": 1, "square[1]": 1,
        "square[2]": 1, "square": 2, "combine": 3, "explode": 4, "never": 5,
    }
    order = [s.name for s in ordered_steps(run)]
    assert order[0] == "load" and order[-3:] == ["combine", "explode", "never"]


def test_parallelism_retries_and_cache_show_in_the_page(stored: Stored) -> None:
    """The page states how many steps ran at once, marks retried and cached steps, and
    colours each node by its status."""
    run = stored.run(stored.second)
    assert run.steps["load"].status is StepStatus.CACHED
    assert run.steps["flaky"].attempts == 3
    assert max_parallelism(run.steps.values()) >= 4  # left, right, flaky, square[k]
    page = render_report(run)
    assert re.search(r'<g class="node status-cached" data-step="load"', page)
    assert f'stroke="{STATUS_COLORS["failed"]}"' in page
    node = page[page.index('data-step="flaky"'):]
    assert "×3" in node[:1500] and "3 attempts" in node[:1500]
    assert '<rect class="retries"' in page
    assert "steps at once (max " in page
    assert page.count('class="node status-skipped"') == 1


def test_a_run_without_edges_is_placed_by_start_time() -> None:
    """A run stored without dependency edges is drawn in waves by start time, with a note."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    run = PipelineRun(id="r1", name="old-run", pipeline_name="old", start_time=t0,
                      status=RunStatus.FAILED)
    run.end_time = t0 + timedelta(seconds=5)
    spans = {"a": (0, 1), "b": (0.5, 2), "c": (1.5, 3), "d": (3.5, 4)}
    for name, (start, end) in spans.items():
        sr = StepRun(id=name, name=name, step_name=name, pipeline_run_id="r1",
                     config=StepRunConfig(), status=StepStatus.COMPLETED)
        sr.start_time, sr.end_time = t0 + timedelta(seconds=start), t0 + timedelta(seconds=end)
        sr.attempts = 1
        run.steps[name] = sr
    run.steps["d"].status = StepStatus.FAILED
    run.steps["d"].error = ErrorInfo("KeyError", "'x'", "Traceback ...")
    assert dag_edges(run) is None
    assert layers(run) == {"a": 0, "b": 0, "c": 1, "d": 2}
    page = render_report(run)
    assert "stored without its dependency edges" in page
    assert page.count('class="edge"') == 0 and page.count('class="node ') == 4


def test_format_duration() -> None:
    """Durations read naturally from milliseconds to hours."""
    assert [format_duration(x) for x in (None, 0.0123, 4.2, 185, 3720)] == [
        "-", "0.012s", "4.20s", "3m 05s", "1h 02m"]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _chromium(tmp_path: Path) -> Any:
    """A headless Chromium WebDriver that keeps the page's console log (skips without one)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("headless Chromium is not installed "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1400,1100",
                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_report_in_headless_chromium(stored: Stored, tmp_path: Path) -> None:
    """In headless Chromium the page loads without console errors, shows every step, shows a
    hover card with the error, and a screenshot is taken."""
    page = tmp_path / "report.html"
    assert stored.cli("runs", "report", stored.second, "-o", str(page)).returncode == 0
    driver = _chromium(tmp_path)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(page.as_uri())
        assert driver.title.startswith(stored.second)
        nodes = driver.find_elements(By.CSS_SELECTOR, "#dag .node")
        assert sorted(n.get_attribute("data-step") or "" for n in nodes) == sorted(STEPS)
        assert all(n.is_displayed() for n in nodes)
        bars = driver.find_elements(By.CSS_SELECTOR, "#timeline .bar")
        assert sorted(b.get_attribute("data-step") or "" for b in bars) == sorted(STEPS)
        assert driver.find_element(By.ID, "run-status").text.lower() == "failed"
        assert driver.execute_script("return document.querySelectorAll('too').length") == 0

        tip = driver.find_element(By.ID, "tip")
        assert not tip.is_displayed()
        failed = driver.find_element(By.CSS_SELECTOR, '#dag .node[data-step="explode"]')
        ActionChains(driver).move_to_element(failed).perform()
        WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
        assert "explode" in tip.text and "ValueError: total" in tip.text
        assert "<too>" in tip.text and "attempts" in tip.text and "duration" in tip.text
        retried = driver.find_element(By.CSS_SELECTOR, '#timeline .bar[data-step="flaky"]')
        ActionChains(driver).move_to_element(retried).perform()
        WebDriverWait(driver, 10).until(lambda d: "flaky" in tip.text)
        assert re.search(r"attempts\s*3", tip.text), tip.text

        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


class _Waiting(HTMLParser):
    """The timeline's bars (by step), and those that hold a waiting segment."""

    def __init__(self) -> None:
        super().__init__()
        self.in_timeline = False
        self.bar: str | None = None
        self.bars: list[str] = []
        self.waiting: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.in_timeline = a.get("id") == "timeline"
        if self.in_timeline and tag == "g" and a.get("data-step"):
            self.bar = a["data-step"]
            self.bars.append(self.bar or "")
        if self.in_timeline and tag == "g" and a.get("class") == "waiting":
            assert self.bar is not None
            self.waiting.append(self.bar)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """A run of three steps contending for a pool of one slot, read back from its SQLite
    store."""
    root = tmp_path_factory.mktemp("pooled")
    made = contended.with_options(stack=Stack.local(root).with_pools(gpu=1))()
    return Client(Stack.local(root)).get_pipeline_run(made.name)


def test_time_waiting_for_a_pool_slot_is_a_segment_of_the_timeline(pooled: PipelineRun,
                                                                     stored: Stored) -> None:
    """Each step that waited for a pool slot has a waiting segment at the start of its bar,
    the wait in its hover data and the steps table, and the timeline has a legend entry;
    a step that did not wait has no segment, and a run without pools no legend either."""
    run = pooled
    waited = {s.name for s in run.steps.values() if waited_noticeably(s.waited)}
    assert len(waited) >= 2, {s.name: s.waited for s in run.steps.values()}
    page = render_report(run)
    parsed = _Waiting()
    parsed.feed(page)
    assert sorted(parsed.bars) == sorted(run.steps)
    assert sorted(parsed.waiting) == sorted(waited)
    assert 'id="timeline-legend"' in page and "waiting for a pool slot" in page
    found = re.search(r'id="step-data">(.*?)</script>', page, re.S)
    assert found is not None
    data = json.loads(found.group(1))
    timeline = page[page.index('<svg id="timeline"'):]
    for name, s in run.steps.items():
        assert data[name]["waited"] == (format_duration(s.waited) if name in waited else None)
        if name in waited:
            # The segment starts the bar, and the running part begins where it ends.
            bar = timeline[timeline.index(f'data-step="{name}"'):]
            segment = re.search(r'<g class="waiting"><rect x="([\d.]+)" y="[\d.]+" '
                                r'width="([\d.]+)".*?</g><rect x="([\d.]+)"', bar)
            assert segment is not None, bar[:600]
            x, w, run_x = (float(v) for v in segment.groups())
            assert w > 1.5 and abs(x + w - run_x) < 0.15
            note = re.search(r'<text class="note"[^>]*>([^<]*)</text>', bar)
            assert note is not None and note.group(1).endswith(
                f" · waited {format_duration(s.waited)}"), bar[:600]
    assert "<th>waited</th>" in page
    plain = render_report(stored.run(stored.second))
    assert 'class="waiting"' not in plain and "timeline-legend" not in plain
    assert "<th>waited</th>" not in plain


def test_waiting_in_headless_chromium(pooled: PipelineRun, tmp_path: Path) -> None:
    """In headless Chromium the hover card of a step that waited for a pool slot says how
    long, the waiting segment is drawn, and the page logs no errors."""
    page = write_report(pooled, tmp_path / "pooled.html")
    driver = _chromium(tmp_path)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name, s = max(pooled.steps.items(), key=lambda kv: kv[1].waited)
    try:
        driver.get(page.as_uri())
        segment = driver.find_element(By.CSS_SELECTOR,
                                      f'#timeline .bar[data-step="{name}"] .waiting rect')
        assert segment.is_displayed() and segment.size["width"] > 10
        assert driver.find_element(By.ID, "timeline-legend").text == "waiting for a pool slot"
        tip = driver.find_element(By.ID, "tip")
        ActionChains(driver).move_to_element(segment).perform()
        WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
        assert re.search(rf"waited for a pool slot\s*{re.escape(format_duration(s.waited))}",
                         tip.text), tip.text
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
