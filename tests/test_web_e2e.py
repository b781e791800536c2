"""The console and DICOMweb with real clients: Orthanc's DICOMweb plugin, storescu, Chromium.

One running node (``ainode serve`` with ``web.enabled``) and one Orthanc
with its DICOMweb plugin (Debian ``orthanc-dicomweb``):

* Orthanc is the STOW-RS *source*: it sends a phantom CT study to the node
  over DICOMweb (``/dicom-web/servers/node/stow``, HTTP Basic as a user
  made with ``ainode users add``); the node routes it to the pancreas
  pipeline and Orthanc is the STOW-RS *destination* the SEG and SR go back
  to (a ``dicomweb`` destination).
* storescu sends another series over DICOM; headless Chromium logs in, finds
  it on the status and studies pages, opens the phantom's result page and
  sees its finding and the overlay image loaded; a viewer cannot open the
  rule editor.

With AINODE_SCREENSHOTS=DIR set, the browser test saves a screenshot of
each page there (for review; not a test result).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.models import AuditEvent, Job, JobState, Series
from tests.support.browser import chromium
from tests.support.data import dicom_series_dir
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProc, start_node
from tests.support.peers import Orthanc, dcmtk_env, orthanc, require

pytestmark = [pytest.mark.peers, pytest.mark.slow]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Setup:
    node: NodeProc
    pacs: Orthanc
    web_url: str
    passwords: dict[str, str]
    phantom_series: str
    phantom_study: str


def _add_user(node: NodeProc, name: str, role: str) -> str:
    r = node.ainode("users", "add", name, "--role", role, "--generate")
    assert r.returncode == 0, r.stderr
    m = re.search(r"^password: (\S+)$", r.stdout, re.M)
    assert m, r.stdout
    return m.group(1)


def _db_scalars(node: NodeProc, query: sa.Select[tuple[object]]) -> list[object]:
    db = node.db
    try:
        with db.session() as s:
            return list(s.scalars(query))
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from pipelines.phantom.generator import PhantomSpec, generate
    from pipelines.phantom.io import write_dicom_series

    if not DICOMWEB_PLUGIN.exists():
        raise RuntimeError("orthanc-dicomweb is not installed; `make peers` installs it")
    tmp = tmp_path_factory.mktemp("web-e2e")
    web_port = free_port()
    node_url = f"http://127.0.0.1:{web_port}"
    # Orthanc must know the node's DICOMweb address and credentials at start-up; the
    # credentials are made below, so a second Orthanc config is written once they exist.
    phantom = generate(PhantomSpec(seed=777018, contrast="ct", diagnosis="PDAC",
                                   lesion_diameter_mm=25.0))
    files = write_dicom_series(phantom, tmp / "phantom", seed=777018)
    pacs_http = free_port()
    node = start_node(tmp, workers=1, stable_age_s=2.0, extra={
        "web": {"enabled": True, "port": web_port},
        "destinations": [{"name": "orthanc-web", "type": "dicomweb",
                          "url": f"http://127.0.0.1:{pacs_http}/dicom-web",
                          "accepts": ["SEG", "SR"]}]})
    try:
        passwords = {u: _add_user(node, u, role) for u, role in
                     (("orthanc", "admin"), ("ada", "admin"), ("vic", "viewer"))}
        add = node.ainode("rules", "add", "web-ct", "--when", "Modality=CT", "--pipeline",
                          "pancreas-ct", "--send-to", "orthanc-web")
        assert add.returncode == 0, add.stderr
        extra = {"Plugins": [str(DICOMWEB_PLUGIN)],
                 "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                     "node": {"Url": f"{node_url}/dicomweb/", "Username": "orthanc",
                              "Password": passwords["orthanc"]}}}}
        with orthanc(tmp / "pacs", aet="WEBPACS", extra_config=extra,
                     http_port=pacs_http) as pacs:
            assert pacs.http_port == pacs_http
            study_ids = {pacs.upload(f)["ParentStudy"] for f in files}
            assert len(study_ids) == 1
            import pydicom

            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            r = node.ainode("destinations", "add", "orthanc-dicom", "--ae-title", "WEBPACS",
                            "--host", "127.0.0.1", "--port", str(pacs.dicom_port))
            assert r.returncode == 0, r.stderr
            # Orthanc, the STOW-RS source: the study goes to the node over DICOMweb.
            pacs.post("/dicom-web/servers/node/stow", {"Resources": list(study_ids)},
                      timeout=300)
            yield Setup(node, pacs, node_url, passwords, str(first.SeriesInstanceUID),
                        str(first.StudyInstanceUID))
    finally:
        node.stop()


def test_orthanc_stows_a_study_in_and_receives_the_results_by_stow(setup: Setup) -> None:
    (orthanc_study,) = setup.pacs.get("/studies")
    n = len(setup.pacs.get(f"/studies/{orthanc_study}/instances"))
    received = _db_scalars(setup.node, sa.select(AuditEvent.actor).where(
        AuditEvent.event == "instance.received"))
    assert received.count("STOW:orthanc") == n  # acknowledged only once recorded

    def delivered() -> bool:
        return "transfer.sent" in _db_scalars(setup.node, sa.select(AuditEvent.event).where(
            AuditEvent.series_uid == setup.phantom_series))

    wait_for(delivered, timeout=240, interval=1.0, what="results sent over STOW-RS")
    jobs = _db_scalars(setup.node, sa.select(Job).join(Series).where(
        Series.series_instance_uid == setup.phantom_series))
    assert len(jobs) == 1 and jobs[0].state is JobState.DONE  # type: ignore[attr-defined]

    def modalities() -> set[str]:
        return {s["MainDicomTags"].get("Modality") for s in
                setup.pacs.get(f"/studies/{orthanc_study}/series")}

    wait_for(lambda: {"SEG", "SR"} <= modalities(), timeout=60,
             what="SEG and SR in Orthanc's study")
    # Orthanc's QIDO-RS now finds the node's SEG in the study it sent.
    series = setup.pacs.get(f"/dicom-web/studies/{setup.phantom_study}/series")
    assert "SEG" in {s["00080060"]["Value"][0] for s in series}
    # What a monitoring system sees (HTTP Basic here; Prometheus can send a bearer token).
    import requests

    auth = ("orthanc", setup.passwords["orthanc"])
    ready = requests.get(f"{setup.web_url}/readyz", auth=auth, timeout=30)
    assert ready.status_code == 200 and ready.json()["receivers"] is True
    metrics = requests.get(f"{setup.web_url}/metrics", auth=auth, timeout=30).text
    assert (f'ainode_store_outcomes_total{{outcome="success",transport="stow"}} {n}.0'
            in metrics)
    assert 'ainode_jobs{pipeline="pancreas-ct",state="done"} 1.0' in metrics
    assert 'ainode_job_duration_seconds_count 1.0' in metrics
    sent = re.search(r'ainode_sends_total\{destination="orthanc-web",outcome="sent"\} (\S+)',
                     metrics)
    assert sent and float(sent.group(1)) >= 2  # the SEG and the SR
    assert requests.get(f"{setup.web_url}/metrics", timeout=30).status_code == 401
    # WADO-RS serves the node's results too: a DICOMweb viewer finds the SEG beside the CT.
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = auth
    client = DICOMwebClient(url=f"{setup.web_url}/dicomweb", session=session)
    by_modality = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0]
                   for s in client.search_for_series(setup.phantom_study)}
    assert {"CT", "SEG", "SR"} <= set(by_modality)
    (seg,) = client.retrieve_series(setup.phantom_study, by_modality["SEG"])
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == setup.phantom_series


def _storescu(node: NodeProc, folder: Path) -> None:
    files = sorted(str(p) for p in folder.iterdir())
    r = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                        "127.0.0.1", str(node.port), *files], env=dcmtk_env(),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _login(driver: object, url: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    d = driver
    d.get(url + "/login")  # type: ignore[attr-defined]
    d.find_element(By.ID, "username").send_keys(user)  # type: ignore[attr-defined]
    d.find_element(By.ID, "password").send_keys(password)  # type: ignore[attr-defined]
    d.find_element(By.ID, "login").click()  # type: ignore[attr-defined]
    wait_for(lambda: not d.current_url.endswith("/login"), timeout=20,  # type: ignore[attr-defined]
             what="the login to go through")


def _text_of(driver: object, element_id: str) -> str | None:
    """The element's text once the page holding it has settled, or None while it is absent
    or belongs to a page the browser is leaving (Chromium then calls it stale)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.ID, element_id)  # type: ignore[attr-defined]
        return str(found[0].text) if found else None
    except WebDriverException:
        return None


def test_browser_sees_what_arrived_and_the_result_and_roles_hold(setup: Setup) -> None:
    import pydicom
    from selenium.webdriver.common.by import By

    folder = dicom_series_dir("mr_head_siemens_t1sag")
    mr_series = str(pydicom.dcmread(next(folder.iterdir()),
                                    stop_before_pixels=True).SeriesInstanceUID)
    _storescu(setup.node, folder)
    shots = os.environ.get("AINODE_SCREENSHOTS")
    url = setup.web_url

    def shot(d: object, name: str) -> None:
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(Path(shots) / f"{name}.png"))  # type: ignore[attr-defined]

    with chromium() as d:
        d.get(url + "/studies")
        assert d.current_url.endswith("/login")  # nothing without logging in
        _login(d, url, "ada", setup.passwords["ada"])
        assert mr_series in d.find_element(By.ID, "recent").text
        shot(d, "status")
        d.get(url + "/studies")
        assert mr_series in d.find_element(By.ID, "studies").text
        shot(d, "studies")
        # The phantom's result (the other test, or this wait, made it).
        wait_for(lambda: _db_scalars(setup.node, sa.select(Job.id).join(Series).where(
            Series.series_instance_uid == setup.phantom_series,
            Job.state == JobState.DONE)), timeout=240, interval=1.0, what="the phantom's job")
        d.get(url + "/studies")
        d.find_element(By.CSS_SELECTOR, f'a[href="/series/{setup.phantom_series}"]').click()
        wait_for(lambda: d.find_elements(By.ID, "findings"), timeout=60,
                 what="the result page")
        assert "Research use only" in d.find_element(By.ID, "disclaimer").text
        findings = d.find_element(By.ID, "findings").text
        assert "probability" in findings.lower() or re.search(r"0\.\d\d", findings)
        img = d.find_element(By.ID, "overlay")
        wait_for(lambda: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", img), timeout=60,
            what="the overlay image to load")
        assert d.execute_script("return arguments[0].naturalWidth", img) >= 128
        shot(d, "series-result")
        for page in ("jobs", "rules", "destinations", "audit", "models"):
            d.get(f"{url}/{page}")
            assert d.find_element(By.TAG_NAME, "h1").text
            shot(d, page)
        d.get(f"{url}/rules?test_rule=web-ct&series_uid={mr_series}")
        assert "web-ct matches 1" in d.find_element(By.ID, "replay").text  # the phantom
        assert "does not equal" in d.find_element(By.ID, "rule-test").text  # MR is not CT
        for name, says in (("orthanc-dicom", "echo succeeded"), ("orthanc-web",
                                                                 "echo succeeded")):
            # A fresh page each time: the previous echo's result must not be read as this
            # one's while the browser is still leaving the old page (a stale element).
            d.get(url + "/destinations")
            assert not d.find_elements(By.ID, "echo-result")
            d.find_element(By.CSS_SELECTOR,
                           f'form[action="/destinations/{name}/echo"] button').click()
            text = wait_for(lambda: _text_of(d, "echo-result"), timeout=30,
                            what="the echo result")
            assert text == f"{name}: {says}"
        d.get(url + "/rules/edit")
        assert d.find_element(By.ID, "rule-editor")
        shot(d, "rule-editor")
        d.find_element(By.CSS_SELECTOR, "header form button").click()  # log out
        wait_for(lambda: d.current_url.endswith("/login"), timeout=20, what="logout")
        _login(d, url, "vic", setup.passwords["vic"])
        d.get(url + "/rules/edit")
        assert d.find_element(By.TAG_NAME, "h1").text == "403"
        assert not d.find_elements(By.ID, "rule-editor")
        d.get(url + "/rules")
        assert not d.find_elements(By.ID, "add-rule")  # and is not offered it
        shot(d, "viewer-rules")
