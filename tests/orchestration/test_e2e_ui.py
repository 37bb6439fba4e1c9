"""The Dagster UI, as its users drive it: `dagster dev` on loopback (a temporary DAGSTER_HOME holding the project's
dagster.yaml), headless Chromium (Debian's package, through selenium and chromedriver).

The global asset lineage shows every asset; "Materialize all" clicked in the page runs the small pipeline in a
temporary DVC repository to success; afterwards every asset's data version equals dvc.lock and `dvc status`
has nothing to do. `LLAVA_SAVE_LINEAGE_PNG=1` also writes the screenshot to docs/lineage.png (the README's).
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
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT, dvc_project
from tests.orchestration.conftest import run

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ASSETS = {
    "raw_synthetic_shapes": ("download_synthetic_shapes", "data/raw/synthetic_shapes"),
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
LATEST_QUERY = """{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { tags { key value } } } }"""


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
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except OSError:  # the server is not answering yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
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


@pytest.fixture
def dvc_workspace(tmp_path, venv_env) -> Path:
    return dvc_project(tmp_path / "repo", venv_env).parent


@pytest.fixture
def dagster_dev(tmp_path, dvc_workspace, venv_env):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "configs/dagster/dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = {
        **venv_env,
        "DAGSTER_HOME": str(home),
        "LLAVA_PARAMS": str(dvc_workspace / "params.yaml"),
        "LLAVA_EXECUTOR": "in_process",  # one process for the run's steps: no start-up per step on 2 cores
    }
    env.pop("LLAVA_ENV", None)
    log = open(tmp_path / "dagster_dev.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the webserver, the daemon, the code server, the runs
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("dagster dev", lambda: urllib.request.urlopen(f"{base}/server_info", timeout=5).status == 200, 180)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # dagster dev shuts its services down on Ctrl-C
        try:
            proc.wait(timeout=30)
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
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1800,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ui_lineage_and_materialize_all(dagster_dev, browser, dvc_workspace, tmp_path, venv_env):
    from selenium.webdriver.common.by import By

    base = dagster_dev
    show_lineage(browser, base)  # every asset has its node

    button = wait_for(
        "the Materialize all button",
        lambda: [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Materialize all"],
        60,
    )[0]
    button.click()
    run_id = wait_for("a launched run", lambda: graphql(base, RUNS_QUERY)["runsOrError"]["results"], 60)[0]["runId"]

    def finished():
        runs = {r["runId"]: r["status"] for r in graphql(base, RUNS_QUERY)["runsOrError"]["results"]}
        return runs[run_id] if runs[run_id] in ("SUCCESS", "FAILURE", "CANCELED") else None

    status = wait_for("the run to finish", finished, 600, every_s=3)
    assert status == "SUCCESS", (tmp_path / "dagster_dev.log").read_text()[-5000:]

    # Dagster and DVC agree on every asset: data versions equal dvc.lock, nothing for dvc to do
    lock = yaml.safe_load((dvc_workspace / "dvc.lock").read_text())["stages"]
    nodes = graphql(base, LATEST_QUERY)["assetNodes"]
    versions = {
        "/".join(n["assetKey"]["path"]): {t["key"]: t["value"] for t in n["assetMaterializations"][0]["tags"]}
        for n in nodes
    }
    for key, (stage, path) in ASSETS.items():
        outs = {o["path"]: o["md5"] for o in lock[stage]["outs"]}
        assert versions[key]["dagster/data_version"] == outs[path], key
    assert "up to date" in run(["dvc", "status"], dvc_workspace, venv_env)

    show_lineage(browser, base)  # now with every asset materialised
    shot = tmp_path / "lineage.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("LLAVA_SAVE_LINEAGE_PNG") == "1":
        shutil.copy(shot, PROJECT / "docs" / "lineage.png")
    report = json.loads((dvc_workspace / "reports/eval.json").read_text())
    assert report["num_questions"] == 7 * 2  # the small source's two held-out images
