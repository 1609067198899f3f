"""What a person browsing the MLflow UI sees after the tiny pipeline ran against the tracking server: Debian's
headless Chromium, driven by Playwright, opens the experiment on the server (127.0.0.1 only), expands the pipeline's
parent run to its stage runs, opens a stage run and reads a metric, and views the NIAH heatmap and the comparison
report through the artifact proxy. Each test leaves a screenshot in its tmp dir.

The pipeline run is the package fixture that ``test_pipeline_against_servers.py`` uses (one run for both files).
Skips with the reason when Chromium or the ``playwright`` package is missing (``.ci/browser-deps.sh`` installs
Chromium; Playwright's own browser download does not work on these machines, so we launch Debian's binary).

MLflow 3.17's UI opens an untagged experiment in its "GenAI" view; ours carry ``mlflow.experimentKind =
custom_model_development`` (``refine_core.tracking``), so the pages below open on the runs table with plain URLs,
as a person following a link would see them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.components.test_local_pipeline import STAGE_RUNS
from tests.integration.conftest import EXPERIMENT, RUN_NAME, PipelineRun

CHROMIUM = os.environ.get("REFINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As on python.md: no sandbox (root), no GPU, and none of Chromium's own background connections.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
TIMEOUT_MS = 30_000


def _skip_reason() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (install Debian's chromium: bash .ci/browser-deps.sh)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright; its browser download is not needed)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

if SKIP_REASON is None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, pipeline_run: PipelineRun) -> Iterator[tuple]:
    """A headless Chromium context with a fresh profile that can reach only the MLflow server: every other request
    (any host but the server's 127.0.0.1 port) is aborted and recorded."""
    from playwright.sync_api import sync_playwright

    assert pipeline_run.returncode == 0, pipeline_run.output()
    server = pipeline_run.server.url
    blocked: list[str] = []

    def guard(route) -> None:
        url = route.request.url
        if url.startswith((f"{server}/", "data:", "blob:")) or url == server:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1600, "height": 1000}, timeout=60_000,
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            context.route("**/*", guard)
            yield context, server, blocked
        finally:
            context.close()


@pytest.fixture(scope="module")
def ids(pipeline_run: PipelineRun, tracking_client) -> dict:
    """The experiment, the parent run and the stage runs (by stage) as the API sees them."""
    experiment = tracking_client.get_experiment_by_name(EXPERIMENT)
    [parent] = tracking_client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`refine.role` = 'pipeline' and tags.`refine.run_name` = "
        f"'{RUN_NAME}'")
    children = tracking_client.search_runs([experiment.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {"experiment": experiment.experiment_id, "parent": parent,
            "stages": {r.info.run_name.removeprefix(f"{RUN_NAME}-"): r for r in children}}


def _runs_page(page, server: str, experiment_id: str) -> None:
    # no ?workflowType=machine_learning: the experiment's mlflow.experimentKind tag opens the model-training view
    page.goto(f"{server}/#/experiments/{experiment_id}/runs", wait_until="load")
    page.get_by_role("link", name=f"{RUN_NAME}-pipeline", exact=True).wait_for()


def _expand_parent(page, child: str) -> None:
    """Click the [+] next to the parent run's name unless its nested stage runs show already (the UI remembers
    expanded rows between pages), then wait for the stage run ``child``."""
    link = page.get_by_role("link", name=f"{RUN_NAME}-{child}", exact=True)
    try:
        link.wait_for(state="visible", timeout=3_000)
    except PlaywrightTimeout:
        row = page.locator("[role=row]", has_text=f"{RUN_NAME}-pipeline").first
        row.locator("button[data-component-id*=runnamecellrenderer]").click()
        link.wait_for(state="visible")


@contextmanager
def new_page(context, screenshot: Path, full_page: bool = False) -> Iterator:
    """A fresh tab; its screenshot is saved when the test ends, whether it passed or not."""
    page = context.new_page()
    try:
        yield page
    finally:
        try:
            page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            page.close()


def test_the_experiment_page_shows_the_pipeline_and_its_stage_runs(browser, ids, tmp_path: Path) -> None:
    context, server, _ = browser
    with new_page(context, tmp_path / "experiment-runs.png") as page:
        _runs_page(page, server, ids["experiment"])
        page.get_by_text(f"{1 + len(STAGE_RUNS)} matching runs").wait_for()
        _expand_parent(page, "train-refine")
        for stage in STAGE_RUNS:
            link = page.get_by_role("link", name=f"{RUN_NAME}-{stage}", exact=True)
            link.wait_for(state="visible")
            assert link.get_attribute("href").endswith(f"/runs/{ids['stages'][stage].info.run_id}")


def test_a_stage_run_page_shows_its_metrics(browser, ids, tmp_path: Path) -> None:
    context, server, _ = browser
    run = ids["stages"]["train-refine"]
    with new_page(context, tmp_path / "stage-run.png") as page:
        _runs_page(page, server, ids["experiment"])
        _expand_parent(page, "train-refine")
        page.get_by_role("link", name=f"{RUN_NAME}-train-refine", exact=True).click()  # what a person clicks
        page.wait_for_url(re.compile(rf".*/runs/{run.info.run_id}.*"))
        row = page.locator("tr, [role=row]", has_text="refine/reward_mean").first
        row.wait_for(state="visible")
        row.scroll_into_view_if_needed()  # so that the screenshot shows it
        shown = row.inner_text().split("refine/reward_mean", 1)[1]
        numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", shown)]
        expected = run.data.metrics["refine/reward_mean"]
        assert any(math.isclose(n, expected, rel_tol=1e-3, abs_tol=1e-3) for n in numbers), (shown, expected)
        page.get_by_role("link", name=f"{RUN_NAME}-pipeline", exact=True).wait_for(state="visible")  # "Parent run"


def _open_artifact(page, server: str, ids: dict, run, path: str) -> None:
    """Open the run's Artifacts tab and click through the folders to the file ``path``, as a person would; the UI
    fetches the file through the server's artifact proxy (``/get-artifact``), which must answer 200."""
    page.goto(f"{server}/#/experiments/{ids['experiment']}/runs/{run.info.run_id}/artifacts", wait_until="load")
    *folders, name = path.split("/")
    for folder in folders:
        page.get_by_text(folder, exact=True).first.click()
    with page.expect_response(lambda r: "/get-artifact" in r.url and name in r.url) as response:
        page.get_by_text(name, exact=True).first.click()
    assert response.value.status == 200, response.value.status


def test_the_niah_heatmap_is_viewable_in_the_browser(browser, ids, tracking_client, tmp_path: Path) -> None:
    context, server, _ = browser
    run = ids["stages"]["ttt-refine"]
    [heatmap] = [f for folder in tracking_client.list_artifacts(run.info.run_id) if folder.is_dir
                 for f in tracking_client.list_artifacts(run.info.run_id, folder.path)
                 if f.path.endswith("niah_heatmap.png")]
    with new_page(context, tmp_path / "niah-heatmap.png") as page:
        _open_artifact(page, server, ids, run, heatmap.path)
        # The preview is an <img> of a blob: URL made from the proxied bytes; it must have decoded, and hold
        # exactly the artifact's bytes.
        image = page.locator("img[src^='blob:']").first
        image.wait_for(state="visible")
        width, height = image.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        assert width > 100 and height > 100, (width, height)
        size = image.evaluate("async e => (await (await fetch(e.src)).arrayBuffer()).byteLength")
        assert size == heatmap.file_size, (size, heatmap.file_size)


def test_the_comparison_report_is_viewable_on_the_parent_run(browser, ids, tmp_path: Path) -> None:
    context, server, _ = browser
    with new_page(context, tmp_path / "compare-report.png") as page:
        _open_artifact(page, server, ids, ids["parent"], "reports/compare.md")
        page.get_by_text("REFINE vs the NTP baseline").first.wait_for(state="visible")
        page.get_by_text("ntp-baseline").first.wait_for(state="visible")  # the table's column, as text


def test_the_browser_reached_nothing_but_the_server(browser) -> None:
    """Runs last in this module: the UI needed no other host (every other request was aborted, none was made)."""
    _, _, blocked = browser
    assert blocked == [], blocked
