"""The condition grammar and rule evaluation: pure functions, parametrized."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.routing import (
    Condition,
    RuleSpec,
    attributes_from_dataset,
    evaluate_rule,
    parse_condition,
)
from node.routing.conditions import evaluate
from storage.errors import InputError
from storage.ingest import ROUTING_KEYWORDS, read_file_header, read_header
from tests.support.data import dicom_series_dir


@pytest.mark.parametrize(
    ("text", "key", "op", "value"),
    [
        ("Modality=CT", "Modality", "=", "CT"),
        ("Modality!=SR", "Modality", "!=", "SR"),
        ("SeriesDescription~abd|pancrea|portal", "SeriesDescription", "~", "abd|pancrea|portal"),
        ("SliceThickness<3", "SliceThickness", "<", 3.0),
        ("SliceThickness<=3", "SliceThickness", "<=", 3.0),
        ("SliceThickness>0.5", "SliceThickness", ">", 0.5),
        ("SliceThickness>=-1", "SliceThickness", ">=", -1.0),
        ("Modality=CT|MR", "Modality", "in", ("CT", "MR")),
        ("ContrastBolusAgent?", "ContrastBolusAgent", "present", None),
        ("!ContrastBolusAgent", "ContrastBolusAgent", "absent", None),
        ("CallingAE=PACS", "CallingAE", "=", "PACS"),
        (" BodyPartExamined = ABDOMEN ", "BodyPartExamined", "=", "ABDOMEN"),
    ],
)
def test_grammar(text: str, key: str, op: str, value: Any) -> None:
    cond = parse_condition(text)
    assert (cond.key, cond.op, cond.value) == (key, op, value)
    assert parse_condition(cond.to_text()) == cond
    assert Condition.from_dict(cond.to_dict()) == cond


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Modalty=CT", "unknown DICOM keyword 'Modalty'"),
        ("!Nonsense", "unknown DICOM keyword"),
        ("SeriesDescription~(abd", "bad regular expression"),
        ("SliceThickness<=thin", "needs a number"),
        ("SliceThickness>nan", "finite number"),
        ("Modality=", "has no value"),
        ("Modality=CT||MR", "empty alternative"),
        ("Modality", "cannot parse"),
        ("=CT", "cannot parse"),
        ("!Modality=CT", "cannot parse"),
        ("Patient Name=X", "cannot parse"),
    ],
)
def test_refused_conditions(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_condition(text)


ATTRS: dict[str, Any] = {
    "Modality": "CT",
    "SeriesDescription": "Abdomen Portal Venous 3.0",
    "SliceThickness": 3.0,
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "ContrastBolusAgent": "APPLIED",
    "ProtocolName": "",
    "SeriesNumber": 4,
    "CallingAE": "PACS",
}


@pytest.mark.parametrize(
    ("text", "matched"),
    [
        ("Modality=ct", True),  # text equality is case-insensitive
        ("Modality=MR", False),
        ("Modality!=MR", True),
        ("Modality!=CT", False),
        ("Modality=MR|CT", True),
        ("Modality=MR|PT", False),
        ("Modality!=MR|PT", True),  # none of
        ("Modality!=MR|CT", False),
        ("SeriesDescription~PORTAL", True),
        ("SeriesDescription~^portal", False),
        ("SliceThickness<=3", True),
        ("SliceThickness<3", False),
        ("SliceThickness>=3", True),
        ("SliceThickness>3", False),
        ("SliceThickness=3.0", True),  # numeric equality: "3.0" == 3
        ("SeriesNumber=4", True),
        ("ImageType=AXIAL", True),  # any one value of a multi-valued attribute
        ("ImageType=original\\primary\\axial", True),  # or the whole value
        ("ImageType~LOCALIZER", False),
        ("ContrastBolusAgent?", True),
        ("!ContrastBolusAgent", False),
        ("ProtocolName?", False),  # present but empty counts as absent
        ("!ProtocolName", True),
        ("!BodyPartExamined", True),
        ("BodyPartExamined=ABDOMEN", False),
        ("BodyPartExamined!=HEAD", True),  # absent is "not equal"
        ("SliceThickness<1", False),
        ("SeriesNumber>2", True),
        ("CallingAE=pacs", True),
    ],
)
def test_evaluation(text: str, matched: bool) -> None:
    result = evaluate(parse_condition(text), ATTRS)
    assert result.matched is matched, result.reason


def test_failed_condition_names_the_actual_value() -> None:
    spec = RuleSpec.build("abdomen-ct", pipeline="pancreas-ct",
                          when=["Modality=CT", "SliceThickness<=2", "SeriesDescription~liver"])
    ev = evaluate_rule(spec, ATTRS)
    assert not ev.matched
    assert [r.condition.to_text() for r in ev.failed] == ["SliceThickness<=2",
                                                           "SeriesDescription~liver"]
    assert ev.failed[0].actual == 3.0
    assert "3 <= 2 is false" in ev.explain()
    assert "'Abdomen Portal Venous 3.0' does not match /liver/i" in ev.explain()


def test_disabled_rule_reports_conditions_but_never_matches() -> None:
    spec = RuleSpec.build("r", pipeline="pancreas-ct", when=["Modality=CT"], enabled=False)
    ev = evaluate_rule(spec, ATTRS)
    assert not ev.matched and ev.results[0].matched and ev.explain() == "rule is disabled"


def test_validation_of_pipeline_destination_and_shape() -> None:
    spec = RuleSpec.build("r1", pipeline="pancreas-ct", send_to=["pacs,archive"])
    assert spec.destinations == ("pacs", "archive")
    spec.validate(pipelines=[], destinations={"pacs", "archive"})  # reserved name accepted
    with pytest.raises(InputError, match="unknown pipeline 'liver-ct'"):
        spec.with_changes(pipeline="liver-ct").validate(pipelines=["x"], destinations={"pacs"})
    with pytest.raises(InputError, match="unknown destination 'archive'"):
        spec.validate(pipelines=[], destinations={"pacs"})
    for bad in ("", "has space", "x" * 65, "../etc"):
        with pytest.raises(InputError, match="invalid rule name"):
            RuleSpec.build(bad, pipeline="pancreas-ct")
    with pytest.raises(InputError, match="stable age"):
        RuleSpec.build("r", pipeline="pancreas-ct", stable_age_s=0)


def test_yaml_form_round_trips_and_refuses_unknown_keys() -> None:
    spec = RuleSpec.build("abdomen-ct", pipeline="pancreas-ct", priority=10, shadow=True,
                          when=["Modality=CT", "SliceThickness<=3", "!ContrastBolusAgent",
                                "Modality=CT|MR"], send_to=["pacs"], stable_age_s=30)
    assert RuleSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InputError, match="unknown key"):
        RuleSpec.from_dict({**spec.to_dict(), "sendto": ["pacs"]})


def test_attributes_from_a_real_header() -> None:
    path = sorted(dicom_series_dir("ct_abdomen_siemens").glob("*.dcm"))[0]
    attrs = attributes_from_dataset(pydicom.dcmread(path, stop_before_pixels=True),
                                    ["KVP", "PatientPosition"])
    assert attrs["Modality"] == "CT"
    assert attrs["SeriesDescription"] == "CT Body 3.0"
    assert attrs["ContrastBolusAgent"] == "APPLIED"
    assert attrs["SliceThickness"] == 3.0
    assert attrs["PatientPosition"] == "HFS"
    spec = RuleSpec.build("abdomen-ct", pipeline="pancreas-ct",
                          when=["Modality=CT", "SeriesDescription~abd|body|pancrea",
                                "SliceThickness<=3", "ContrastBolusAgent?"])
    assert evaluate_rule(spec, attrs).matched


def test_a_header_read_for_routing_gives_what_ingest_stores() -> None:
    """``ainode rules test --path`` and the receiver read one keyword list with one
    conversion: a rule that matches live traffic must match its test, and back."""
    names = ("ct_phantom_philips", "mr_head_ge_3dt1", "mr_head_philips_enhanced",
             "mr_head_siemens_t1sag")
    files = [p for name in names for p in sorted(dicom_series_dir(name).glob("*.dcm"))[:2]]
    assert len(files) >= len(names)
    for path in files:
        stored = read_header(path.read_bytes()).attributes
        assert stored["Modality"] in ("CT", "MR")
        assert attributes_from_dataset(read_file_header(path), ["CallingAE"]) == stored, path
        assert set(stored) <= set(ROUTING_KEYWORDS)


_values = st.one_of(st.text(max_size=20), st.floats(allow_nan=False),
                    st.lists(st.text(max_size=8), max_size=4), st.none())


@given(value=_values, text=st.sampled_from(
    ["Modality=CT", "Modality~c.", "SliceThickness<3", "Modality?", "!Modality", "Modality=A|B",
     "Modality!=CT", "SliceThickness>=-2", "Modality!=A|B"]))
def test_evaluation_never_raises(value: Any, text: str) -> None:
    result = evaluate(parse_condition(text), {"Modality": value, "SliceThickness": value})
    assert isinstance(result.matched, bool) and result.reason


# -- series that are no image to analyse (storage.image_kind) and the rules that ask for them --

@pytest.mark.parametrize(("attrs", "kind"), [
    ({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
    ({"Modality": "CT", "ImageType": "ORIGINAL\\PRIMARY\\TOPOGRAM"}, "localizer"),
    ({"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "SURVIEW_IMAGE"]}, "localizer"),
    ({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary capture"),
    ({"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4"}, "secondary capture"),
    ({"Modality": "MR", "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}, "derived"),
    ({"Modality": "CT", "PhotometricInterpretation": "RGB"}, "colour"),
    ({"Modality": "US", "PhotometricInterpretation": "YBR_FULL_422"}, "colour"),
    ({"Modality": "CT", "PhotometricInterpretation": "PALETTE COLOR"}, "colour"),
    ({"Modality": "SEG", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4"}, "result object"),
    ({"Modality": "KO"}, "result object"),
    ({"Modality": "SR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}, "result object"),
    ({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
      "PhotometricInterpretation": "MONOCHROME2",
      "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, None),
    ({"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "M", "DERIVED"]}, None),
    ({}, None),  # a sparse header is routed as before
])
def test_what_is_not_an_image_series(attrs: dict[str, Any], kind: str | None) -> None:
    from storage.image_kind import not_an_image

    got = not_an_image(attrs)
    assert (None if got is None else got.kind) == kind
    if got is not None:
        assert got.reason and str(attrs[got.keyword]).upper().find(got.value.upper()) >= 0


def test_the_nodes_own_result_classes_are_result_objects_whatever_their_modality() -> None:
    from pipelines.dicom_out import registry as writers
    from storage.image_kind import not_an_image

    kos = {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.59"}
    assert not_an_image(kos) is None
    got = not_an_image(kos, result_sop_classes=[*writers.result_sop_classes(), kos["SOPClassUID"]])
    assert got is not None and got.kind == "result object"
    sc = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}
    # the node writes SC too, but a received one is named for what it is
    assert not_an_image(sc, result_sop_classes=writers.result_sop_classes()).kind == (  # type: ignore[union-attr]
        "secondary capture")


@pytest.mark.parametrize(("when", "decisive", "expected"), [
    ("ImageType~LOCALIZER", {"ImageType": "LOCALIZER"}, True),
    ("ImageType=localizer", {"ImageType": "LOCALIZER"}, True),
    ("ImageType=AXIAL", {"ImageType": "LOCALIZER"}, False),
    ("ImageType!=AXIAL", {"ImageType": "LOCALIZER"}, False),  # names nothing
    ("ImageType?", {"ImageType": "LOCALIZER"}, False),
    ("SOPClassUID=1.2.840.10008.5.1.4.1.1.7", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, True),
    ("SOPClassUID=1.2.840.10008.5.1.4.1.1.2|1.2.840.10008.5.1.4.1.1.7",
     {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, True),
    ("Modality=CT", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, False),
    ("PhotometricInterpretation~^YBR", {"PhotometricInterpretation": "YBR_FULL"}, True),
    ("Modality=SEG", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4", "Modality": "SEG"}, True),
])
def test_a_rule_opts_in_only_by_naming_the_deciding_value(
        when: str, decisive: dict[str, Any], expected: bool) -> None:
    from node.routing import opts_in

    spec = RuleSpec.build("r", pipeline="pancreas-ct", when=["Modality?", when])
    assert opts_in(spec, decisive) is expected
