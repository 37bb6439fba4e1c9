"""The Dagster UI, as its users drive it: `dagster dev` on loopback (the DAGSTER_HOME that `make demo` recorded its
run in, holding the project's dagster.yaml), headless Chromium (Debian's package, through selenium and chromedriver).

After `make demo` (`python -m orchestration run` on a small DVC workspace: the `demo_run` fixture), every asset is
in the lineage graph, every asset's page shows its latest materialisation (the run that made it, its data version,
which equals dvc.lock) and `dvc status` has nothing to do; the training and evaluation pages show their pictures
(an <img> drawn at its full size). An asset materialised from its page in the UI runs to success.
`LLAVA_SAVE_DOCS_IMAGES=1` also writes the asset pages' screenshots to docs/images/ (docs/orchestration.md's), and
`LLAVA_SAVE_LINEAGE_PNG=1` the lineage graph to docs/lineage.png (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from tests.helpers_launch import interruptible
from tests.orchestration.conftest import run

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ASSETS = {
    "raw_synthetic_shapes": ("download_synthetic_shapes", "data/raw/synthetic_shapes"),
    "raw_shapes_local": ("download_shapes_local", "data/raw/shapes_local"),
    "jsonl_shapes_pretrain": ("convert_shapes_pretrain", "data/jsonl/shapes_pretrain.jsonl"),
    "jsonl_shapes_instruct": ("convert_shapes_instruct", "data/jsonl/shapes_instruct.jsonl"),
    "hdf5_phase1": ("hdf5_phase1", "data/hdf5/phase1"),
    "hdf5_phase2": ("hdf5_phase2", "data/hdf5/phase2"),
    "checkpoint_phase1": ("train_phase1", "checkpoints/phase1"),
    "checkpoint_phase2": ("train_phase2", "checkpoints/phase2"),
    "hf_model": ("export_hf", "models/hf"),
    "llava_model": ("export_llava", "models/llava"),
    "eval_report": ("evaluate", "reports/eval.json"),
}
RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId status } } } }"
LATEST_QUERY = """{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId tags { key value } } } }"""
PICTURES = {"checkpoint_phase1": "loss_plot", "checkpoint_phase2": "loss_plot", "eval_report": "scores_plot"}
DOCS_IMAGES = ("checkpoint_phase2", "eval_report")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(base: str, query: str) -> dict:
    req = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body
    return body["data"]


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    from selenium.common.exceptions import WebDriverException

    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            value = check()
        except (OSError, WebDriverException) as e:  # the server not answering yet; a page between two documents
            value, last = None, e  # (no <body> for a moment) or re-rendering
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last error: {last!r}")
        time.sleep(every_s)


def missing_assets(browser) -> set[str]:
    """The assets without a node in the page; a long name shows shortened in its node (`jsonl_sh…_instruct`)."""
    from selenium.webdriver.common.by import By

    labels = set(browser.find_element(By.TAG_NAME, "body").text.splitlines())

    def shown(key: str) -> bool:
        return key in labels or any(
            "…" in label and key.startswith(label.split("…")[0]) and key.endswith(label.split("…")[1])
            for label in labels
        )

    return {k for k in ASSETS if not shown(k)}


def show_lineage(browser, base: str) -> None:
    """Open Assets -> Global asset lineage with every group expanded, and wait for every asset's node."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{base}/asset-groups")
    materialize = "//button[normalize-space(.)='Materialize all']"
    wait_for("the asset graph", lambda: browser.find_elements(By.XPATH, materialize), 120)
    time.sleep(2)
    skip = browser.find_elements(By.XPATH, "//button[normalize-space(.)='Skip']")  # the first-visit newsletter dialog
    if skip:
        skip[0].click()
    if missing_assets(browser):  # the graph opens with its groups collapsed; "Expand all groups" is Alt+E
        ActionChains(browser).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
    wait_for("every asset in the lineage graph", lambda: not missing_assets(browser), 60)
    time.sleep(2)  # let the graph finish its layout


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory, demo_run):
    """`dagster dev` (what `make dagster` runs) on the DAGSTER_HOME and workspace of `make demo`, one for the
    module's tests (the page test only reads; the materialisation test reads what it makes)."""
    port = free_port()
    env = {**demo_run.env, "LLAVA_EXECUTOR": "in_process"}  # a run launched here: one process, no start-up per step
    log_path = tmp_path_factory.mktemp("dagster_dev") / "dagster_dev.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the webserver, the daemon, the code server, the runs
        preexec_fn=interruptible,  # Ctrl-C at its default even when the suite runs in the background
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("dagster dev", lambda: urllib.request.urlopen(f"{base}/server_info", timeout=5).status == 200, 180)
        yield types.SimpleNamespace(base=base, log=log_path)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # dagster dev shuts its services down on Ctrl-C
        try:
            proc.wait(timeout=10)  # it often takes longer than a test should wait: then the whole group goes
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def latest(base: str) -> dict[str, dict]:
    """Each asset's latest materialisation, as the UI's own API reports it: its run id and tags."""
    return {
        "/".join(n["assetKey"]["path"]): {
            "run": n["assetMaterializations"][0]["runId"],
            **{t["key"]: t["value"] for t in n["assetMaterializations"][0]["tags"]},
        }
        for n in graphql(base, LATEST_QUERY)["assetNodes"]
        if n["assetMaterializations"]
    }


def body_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def open_events(browser, base: str, key: str, run_id: str) -> None:
    """An asset's page, Events tab, once it shows the materialisation of `run_id` (and no first-visit dialog)."""
    from selenium.webdriver.common.by import By

    browser.get(f"{base}/assets/{key}?view=events")
    wait_for(f"{key}'s latest materialisation", lambda: f"Materialized in run {run_id[:8]}" in body_text(browser), 90)
    for skip in browser.find_elements(By.XPATH, "//button[normalize-space(.)='Skip']"):  # the newsletter dialog
        skip.click()


def show_picture(browser, key: str, entry: str):
    """Open the picture of metadata entry `entry` ("[Show Markdown]": too long to show in the table); the dialog."""
    from selenium.webdriver.common.by import By

    find = lambda: browser.find_elements(By.XPATH, "//*[normalize-space(text())='[Show Markdown]']")  # noqa: E731
    links = wait_for(f"{key}'s picture link", find, 30)
    assert len(links) == 1, f"{key}: one picture expected on the page, found {len(links)}"
    links[0].click()
    dialog = wait_for("the picture's dialog", lambda: browser.find_elements(By.CSS_SELECTOR, "[role=dialog]"), 30)[0]
    wait_for("the picture", lambda: dialog.find_elements(By.TAG_NAME, "img"), 30)
    assert entry in dialog.text
    return dialog


def test_every_asset_page_shows_the_demos_materialisation(dagster_dev, browser, demo_run, tmp_path):
    from selenium.webdriver.common.by import By

    base = dagster_dev.base
    show_lineage(browser, base)  # every asset has its node
    shot = tmp_path / "lineage.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("LLAVA_SAVE_LINEAGE_PNG") == "1":
        shutil.copy(shot, PROJECT / "docs" / "lineage.png")
    # Dagster and DVC agree on every asset: data versions equal dvc.lock, nothing for dvc to do
    now = latest(base)
    assert set(now) == set(ASSETS)
    lock = yaml.safe_load((demo_run.repo / "dvc.lock").read_text())["stages"]
    for key, (stage, path) in ASSETS.items():
        outs = {o["path"]: o["md5"] for o in lock[stage]["outs"]}
        assert now[key]["dagster/data_version"] == outs[path], key
    assert "up to date" in run(["dvc", "status"], demo_run.repo, demo_run.env)

    save = os.environ.get("LLAVA_SAVE_DOCS_IMAGES") == "1"
    for key in ASSETS:
        open_events(browser, base, key, now[key]["run"])
        version = now[key]["dagster/data_version"]  # the metadata is shown (the page may still be rendering it)
        wait_for(f"{key}'s metadata", lambda v=version: v in (t := body_text(browser)) and "made_by" in t, 30)
        if key in PICTURES:
            dialog = show_picture(browser, key, PICTURES[key])
            img = dialog.find_element(By.TAG_NAME, "img")
            size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
            assert size == [512, 256], (key, size)  # the PNG decoded at its full size
            if save and key in DOCS_IMAGES:  # docs/orchestration.md's: phase 2's curves, the scores and their page
                (PROJECT / "docs/images").mkdir(exist_ok=True)
                dialog.screenshot(str(PROJECT / f"docs/images/{key}_{PICTURES[key]}.png"))
                if key == "eval_report":
                    browser.save_screenshot(str(PROJECT / f"docs/images/{key}_page.png"))
    report = json.loads((demo_run.repo / "reports/eval.json").read_text())
    assert report["num_questions"] == 7 * 2  # the small source's two held-out images


def test_materialize_an_asset_from_its_page(dagster_dev, browser, demo_run, tmp_path):
    from selenium.webdriver.common.by import By

    base = dagster_dev.base
    before = latest(base)["eval_report"]["run"]
    open_events(browser, base, "eval_report", before)
    button = wait_for(
        "the Materialize button",
        lambda: [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Materialize"],
        60,
    )[0]
    known = {r["runId"] for r in graphql(base, RUNS_QUERY)["runsOrError"]["results"]}
    button.click()

    def finished():
        runs = {r["runId"]: r["status"] for r in graphql(base, RUNS_QUERY)["runsOrError"]["results"]}
        done = [st for rid, st in runs.items() if rid not in known and st in ("SUCCESS", "FAILURE", "CANCELED")]
        return done[0] if done else None

    status = wait_for("the run to finish", finished, 600, every_s=3)
    assert status == "SUCCESS", dagster_dev.log.read_text()[-5000:]
    after = latest(base)["eval_report"]
    assert after["run"] != before
    open_events(browser, base, "eval_report", after["run"])  # the page shows the new materialisation
