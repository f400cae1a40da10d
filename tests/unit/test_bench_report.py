"""docs/benchmarks.md's current figures are what `make bench-report` renders
from the committed results (tests/bench/report.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.bench import report


def test_the_committed_page_is_what_the_results_render() -> None:
    page = report.PAGE.read_text()
    assert report.render_page(page, report.results()) == page, (
        "docs/benchmarks.md differs from what docs/bench-*.json render: run `make bench-report` and commit")


def test_a_changed_result_changes_the_page() -> None:
    page = report.PAGE.read_text()
    found = report.results()
    changed = copy.deepcopy(found)
    changed["setup"]["steps"][0]["legs_per_s"] += 1
    assert report.render_page(page, changed) != page


def test_every_result_names_its_command_machine_and_date() -> None:
    for topic, data in report.results().items():
        run = data.get("run") or {}
        assert run.get("command", "").startswith("sudo .venv/bin/python -m tests.bench."), topic
        assert {"cpu", "kernel", "cores"} <= set(run.get("machine", {})), topic
        assert len(run.get("date", "")) == 10, topic


def test_rendering_twice_changes_nothing() -> None:
    once = report.render_page(report.PAGE.read_text(), report.results())
    assert report.render_page(once, report.results()) == once


def test_a_result_without_a_renderer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bench-new-topic.json").write_text(json.dumps({"run": {}}))
    with pytest.raises(report.ReportError, match="no renderer for topic 'new-topic'"):
        report.results(tmp_path)


def test_a_result_without_its_run_is_refused() -> None:
    found = copy.deepcopy(report.results())
    del found["density"]["run"]
    with pytest.raises(report.ReportError, match="bench-density.json has no `run`"):
        report.render_figures(found)


def test_the_page_needs_its_markers() -> None:
    with pytest.raises(report.ReportError, match="bench-report:begin"):
        report.render_page("# no markers\n", {})
