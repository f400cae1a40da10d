"""Where running labs are recorded: one JSON file per lab under STATE_DIR, so
`relayctl lab down` and the tests find a lab another process brought up."""

from __future__ import annotations

import os

from manager.lab.model import STATE_DIR, Lab, check_prefix, state_file
from manager.lab.netns import LabError


def save_state(lab: Lab) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = lab.state_file
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(lab.to_json())
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def load_lab(prefix: str) -> Lab:
    """The lab recorded by `lab_up(prefix)` (possibly from another process)."""
    check_prefix(prefix)
    try:
        return Lab.from_json(state_file(prefix).read_text())
    except FileNotFoundError:
        raise LabError(f"no lab with prefix {prefix!r} (no {state_file(prefix)})") from None


def list_labs() -> list[Lab]:
    """Labs recorded in STATE_DIR, oldest first (malformed files are skipped)."""
    labs = []
    for path in STATE_DIR.glob("lab-*.json"):
        try:
            labs.append(Lab.from_json(path.read_text()))
        except (OSError, LabError):
            continue
    return sorted(labs, key=lambda lab: (lab.created_at, lab.prefix))

