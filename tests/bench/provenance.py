"""Where and when a benchmark ran, recorded in the JSON it writes under
`run`, so docs/benchmarks.md can name the command, the machine and the date
beside every table (tests/bench/report.py)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine() -> dict:
    return {"cpu": cpu_model(), "kernel": platform.release(), "cores": os.cpu_count()}


def run_info(module: str, argv: list[str] | None = None) -> dict:
    """`run` of a result: the command as given (`python -m module ARGS`),
    this machine and today's date (UTC)."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["sudo .venv/bin/python -m", module, *map(shlex.quote, args)]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
    }
