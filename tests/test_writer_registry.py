"""The one registry of output writers: a tiny plug-in kind reaches every place that lists kinds.

A "TXT" writer (a trivial Basic Text SR header, nothing a PACS would want) is
registered with the decorator, as a plug-in module would; the test then
looks for it where the node decides what exists: the registry, the config's
``accepts`` validation, the receiver's accepted SOP classes and write_results.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from node.config import DestinationConfig, NodeConfig, default_accepts
from node.network.contexts import supported_contexts
from pipelines.dicom_out import registry, write_results
from pipelines.dicom_out.registry import WriterContext, writer
from pipelines.results import (
    PROBABILITY,
    AlgorithmInfo,
    AnalysisResult,
    Code,
    ScoredFinding,
    Segment,
)
from storage.errors import ConfigError, InputError
from tests.plugins import publish
from tests.support.data import dicom_series_dir

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"  # no built-in kind has it
TXT_OFFSET = 50


def _text_dataset(ctx: WriterContext) -> pydicom.Dataset:
    src = ctx.sources[0]
    ds = pydicom.Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = src.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = ctx.series_number
    ds.Modality = "SR"
    ds.ContentLabel = "TXT"
    ds.TextValue = ctx.result.summary()
    return ds


@pytest.fixture
def txt_calls() -> Iterator[list[WriterContext]]:
    """Registers TXT for one test and forgets it after, so no other test sees it."""
    calls: list[WriterContext] = []

    @writer("TXT", sop_classes=(BASIC_TEXT_SR,), series_offset=TXT_OFFSET,
            description="a test kind")
    def write_txt(ctx: WriterContext) -> pydicom.Dataset:
        calls.append(ctx)
        return _text_dataset(ctx)

    yield calls
    registry.unregister("TXT")


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))


def _result(sources: list[pydicom.Dataset]) -> AnalysisResult:
    """A generic result with one finding region, as any pipeline could hand it over."""
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    mask = np.zeros(shape, bool)
    mask[5:8, 100:140, 100:140] = True
    region = Code("SCT", "49755003", "Morphologically Abnormal Structure")
    return AnalysisResult(
        pipeline="test", algorithm=AlgorithmInfo("ainode test", "1"),
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in sources],
        segments=[Segment("spot-1", "Spot 1", region, Code("SCT", "108369006", "Neoplasm"),
                          mask)],
        findings=[ScoredFinding("spot-1", "spot", PROBABILITY, 0.7, kind="lesion",
                                segment="spot-1")],
        summary_text="one spot",
    )


def test_built_in_kinds_and_their_facts() -> None:
    # write order: by series offset; the evidence kinds (issue 20) only when accepted
    assert registry.kinds() == ("SEG", "SR", "GSPS", "SC", "PMAP", "EVSC")
    assert registry.default_kinds() == ("SEG", "SR", "GSPS")
    assert [registry.get(k).series_offset for k in registry.kinds()] == [0, 1, 2, 3, 4, 5]
    assert registry.get("SC").needs_pixels and not registry.get("SEG").needs_pixels
    assert registry.get("EVSC").needs_pixels and not registry.get("PMAP").needs_pixels
    assert "1.2.840.10008.5.1.4.1.1.66.4" in registry.result_sop_classes()
    with pytest.raises(InputError, match="unknown result kind 'PDF'; known: SEG, SR"):
        registry.get("PDF")


def test_registry_imports_no_highdicom() -> None:
    import subprocess

    code = ("import sys; import node.config, node.network.contexts; "
            "from pipelines.dicom_out import registry; registry.kinds(); "
            "print(sorted(m for m in ('highdicom', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_a_registered_kind_appears_everywhere(txt_calls: list[WriterContext]) -> None:
    assert registry.kinds()[-1] == "TXT"
    assert registry.get("TXT").origin.endswith("write_txt")
    assert "TXT" not in registry.default_kinds() and "TXT" not in default_accepts()
    # config validation: a destination may now accept it
    cfg = DestinationConfig(name="d", ae_title="PACS", host="h", port=104,
                            accepts=["SR", "TXT"])
    assert cfg.accepts == ["SR", "TXT"]
    assert NodeConfig(destinations=[cfg]).destinations[0].accepts == ["SR", "TXT"]
    # the receiver takes such objects back
    assert BASIC_TEXT_SR in {str(cx.abstract_syntax) for cx in supported_contexts()}
    registry.unregister("TXT")
    with pytest.raises(ValidationError, match="unknown result kind 'TXT'"):
        DestinationConfig(name="d", ae_title="PACS", host="h", port=104, accepts=["TXT"])
    assert BASIC_TEXT_SR not in {str(cx.abstract_syntax) for cx in supported_contexts()}


def test_write_results_calls_it_after_the_seg(txt_calls: list[WriterContext],
                                              sources: list[pydicom.Dataset]) -> None:
    objs = write_results(_result(sources), sources, {"TXT", "SEG"}, series_number_base=7000)
    assert [o.kind for o in objs] == ["SEG", "TXT"]
    (ctx,) = txt_calls
    assert ctx.series_number == 7000 + TXT_OFFSET
    assert ctx.first("SEG") is objs[0].dataset  # it sees what was written before it
    assert ctx.result.segments[0].tracking_uid  # minted before any writer ran
    assert objs[1].dataset.SeriesNumber == 7000 + TXT_OFFSET
    assert objs[1].dataset.TextValue == "one spot"
    assert write_results(_result(sources), sources, {"SR"})[0].kind == "SR"  # TXT not asked


def test_registration_mistakes_are_refused(txt_calls: list[WriterContext]) -> None:
    def other(ctx: WriterContext) -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        writer("TXT", sop_classes=(BASIC_TEXT_SR,), series_offset=51)(other)
    with pytest.raises(ValueError, match="taken by SEG"):
        writer("OTHER", sop_classes=(BASIC_TEXT_SR,), series_offset=0)(other)
    with pytest.raises(ValueError, match="upper-case"):
        writer("toolongkind", sop_classes=(BASIC_TEXT_SR,), series_offset=52)
    with pytest.raises(ValueError, match="SOP class UIDs"):
        writer("BAD", sop_classes=("not-a-uid",), series_offset=52)


def test_a_writer_must_return_datasets(sources: list[pydicom.Dataset]) -> None:
    @writer("JUNK", sop_classes=(BASIC_TEXT_SR,), series_offset=60)
    def junk(ctx: WriterContext) -> object:
        return ["not a dataset"]

    try:
        with pytest.raises(Exception, match="returned str, not datasets"):
            write_results(_result(sources), sources, {"JUNK"})
    finally:
        registry.unregister("JUNK")


def _plugin(tmp_path: Path, body: str) -> None:
    """A plug-in module published as pip would publish it (a dist-info on sys.path)."""
    (tmp_path / "ainode_txt_plugin.py").write_text(body)
    publish(tmp_path, "ainode-txt-plugin", {registry.GROUP: {"txt": "ainode_txt_plugin"}})


def test_entry_point_plugins_are_imported_on_first_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plugin(tmp_path, (
        "from pipelines.dicom_out.registry import writer\n"
        f"@writer('EPTXT', sop_classes=('{BASIC_TEXT_SR}',), series_offset=70, default=True)\n"
        "def write(ctx):\n    return None\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "EPTXT" in registry.kinds() and "EPTXT" in default_accepts()
    finally:
        registry.unregister("EPTXT")
        sys.modules.pop("ainode_txt_plugin", None)


def test_a_broken_plugin_stops_the_config_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plugin(tmp_path, "raise RuntimeError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        with pytest.raises(ConfigError, match=r"writer plug-in 'txt'.*half installed"):
            DestinationConfig(name="d", ae_title="PACS", host="h", port=104, accepts=["SR"])
    finally:
        sys.modules.pop("ainode_txt_plugin", None)
