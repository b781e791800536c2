"""Logging: structured lines, and no PHI even when a caller passes it by mistake."""

from __future__ import annotations

import io
import json
import logging

import pytest

from node import logs


@pytest.fixture
def capture() -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.PhiFilter())
    logger = logging.getLogger("test.phi")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream, handler


@pytest.mark.parametrize("fmt", [logs.KeyValueFormatter(), logs.JsonFormatter()])
def test_phi_fields_are_redacted(capture, fmt: logging.Formatter) -> None:  # type: ignore[no-untyped-def]
    logger, stream, handler = capture
    handler.setFormatter(fmt)
    logger.info("stored", extra={"series_uid": "1.2.3", "PatientName": "Doe^Jane",
                                 "patient_id": "MRN123"})
    line = stream.getvalue()
    assert "Doe^Jane" not in line and "MRN123" not in line
    assert "1.2.3" in line and "[redacted]" in line


def test_keyvalue_and_json_shapes(capture) -> None:  # type: ignore[no-untyped-def]
    logger, stream, handler = capture
    handler.setFormatter(logs.KeyValueFormatter())
    logger.info("series complete", extra={"series_uid": "1.2", "instances": 20})
    line = stream.getvalue().strip()
    assert 'msg="series complete"' in line and "instances=20" in line and "level=INFO" in line
    stream.truncate(0)
    stream.seek(0)
    handler.setFormatter(logs.JsonFormatter())
    logger.info("x", extra={"job_id": 4})
    doc = json.loads(stream.getvalue())
    assert doc["job_id"] == 4 and doc["msg"] == "x"


def test_configure_respects_level(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log_file = tmp_path / "node.log"
    logs.configure("WARNING", "json", log_file)
    try:
        logging.getLogger("node.test").info("hidden")
        logging.getLogger("node.test").warning("shown", extra={"PatientID": "P1"})
        for h in logging.getLogger().handlers:
            h.flush()
        lines = log_file.read_text().splitlines()
        assert len(lines) == 1 and "P1" not in lines[0]
    finally:
        logs.configure("INFO")
