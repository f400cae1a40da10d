"""--agent SPEC: what resolves to an agent factory, and a clear error for what does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from manager.transceiver.agent import EchoAgent
from manager.transceiver.agent_loader import AgentSpecError, load_agent_factory
from tests.support.paths import REPO

AGENTS = '''
from manager.transceiver.agent import Agent, EchoAgent

class Quiet(Agent):
    async def run(self, session):
        pass

def make_echo():
    return EchoAgent()

def needs_args(transport):
    return None

class NotAnAgent:
    pass

class Bot:
    def agent_factory(self):
        return EchoAgent()

bot = Bot()
answer = 42

raise_here = None
'''


@pytest.fixture
def agents_file(tmp_path):
    path = tmp_path / "my_agents.py"
    path.write_text(AGENTS)
    return path


def test_default_is_the_echo_agent():
    assert load_agent_factory(None) is EchoAgent


def test_module_attribute_and_file_attribute(agents_file):
    assert load_agent_factory("manager.transceiver.agent:EchoAgent") is EchoAgent
    assert load_agent_factory(f"{agents_file}:Quiet")().__class__.__name__ == "Quiet"
    assert isinstance(load_agent_factory(f"{agents_file}:make_echo")(), EchoAgent)
    assert isinstance(load_agent_factory(f"{agents_file}:bot")(), EchoAgent)


@pytest.mark.parametrize("attr, message", [
    ("missing", "has no attribute missing"),
    ("NotAnAgent", "is a class but not an Agent"),
    ("needs_args", "must take no arguments"),
    ("answer", "is not an agent"),
])
def test_bad_attributes_are_named(agents_file, attr, message):
    with pytest.raises(AgentSpecError, match=message):
        load_agent_factory(f"{agents_file}:{attr}")


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected MODULE:ATTRIBUTE"),
    (":x", "expected MODULE:ATTRIBUTE"),
    ("examples/nothing_here.py:x", "no file examples/nothing_here.py"),
    ("no_such_module_xyz:x", "cannot import no_such_module_xyz"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(AgentSpecError, match=message):
        load_agent_factory(spec)


def test_a_file_that_fails_to_import_says_why(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('no model here')\n")
    with pytest.raises(AgentSpecError, match="importing .*broken.py failed: RuntimeError: no model here"):
        load_agent_factory(f"{bad}:x")


def test_transceiver_cli_refuses_a_bad_agent_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "manager.transceiver", "--id", "1", "--pki-dir", str(REPO),
                           "--agent", "nope_xyz:x"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "transceiver: --agent nope_xyz:x: cannot import nope_xyz: No module named 'nope_xyz'"


def test_relayctl_lab_resolves_an_agent_file_to_an_absolute_spec(agents_file, monkeypatch):
    import click

    from cli.relayctl.lab import resolve_agent

    monkeypatch.chdir(agents_file.parent)
    assert resolve_agent("my_agents.py:Quiet") == f"{agents_file}:Quiet"
    assert resolve_agent("manager.transceiver.agent:EchoAgent") == "manager.transceiver.agent:EchoAgent"
    with pytest.raises(click.ClickException, match="has no attribute nothing"):
        resolve_agent("my_agents.py:nothing")
