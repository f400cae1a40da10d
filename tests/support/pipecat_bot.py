"""The example Pipecat bot (examples/pipecat_bot.py), loaded as a module, and RTVI's envelope."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

from tests.support.paths import REPO

BOT_FILE = REPO / "examples" / "pipecat_bot.py"


def load_bot(name: str = "pipecat_bot") -> ModuleType:
    """examples/pipecat_bot.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BOT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rtvi(type_: str, id_: str, data: Any = None) -> str:
    """An RTVI client message as Pipecat's clients send it on the data channel."""
    return json.dumps({"label": "rtvi-ai", "type": type_, "id": id_, "data": data})
