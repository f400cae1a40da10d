"""``--agent SPEC``: the agent a transceiver runs for each call, named on the command line.

SPEC is ``module:attribute`` or ``path/to/file.py:attribute``. The attribute
is one of:

- an :class:`Agent` subclass (one instance a call);
- an object with an ``agent_factory`` attribute (a framework bridge, e.g. a
  Pipecat bot decorated with ``manager.integrations.pipecat_agent.pipecat_bot``);
- a callable with no arguments that returns an :class:`Agent`.

Anything else, or a SPEC that does not resolve, is an :class:`AgentSpecError`
naming what was wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from .agent import Agent, AgentFactory, EchoAgent


class AgentSpecError(ValueError):
    """An --agent SPEC that does not name an agent."""


def _import(target: str, spec: str):
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise AgentSpecError(f"--agent {spec}: no file {target}")
        name = f"splitrelay_agent_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise AgentSpecError(f"--agent {spec}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise AgentSpecError(f"--agent {spec}: cannot import {target}: {exc}") from exc


def load_agent_factory(spec: str | None) -> AgentFactory:
    """The factory for SPEC (None: the echo agent)."""
    if not spec:
        return EchoAgent
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise AgentSpecError(f"--agent {spec}: expected MODULE:ATTRIBUTE or FILE.py:ATTRIBUTE")
    module = _import(target, spec)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise AgentSpecError(f"--agent {spec}: {target} has no attribute {attr}") from None
    factory = getattr(obj, "agent_factory", None)
    if callable(factory):
        return factory
    if inspect.isclass(obj):
        if issubclass(obj, Agent):
            return obj
        raise AgentSpecError(f"--agent {spec}: {attr} is a class but not an Agent")
    if callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise AgentSpecError(f"--agent {spec}: {attr} must take no arguments and return an Agent "
                                 "(a Pipecat pipeline factory needs the pipecat_bot decorator)") from None
        return obj
    raise AgentSpecError(f"--agent {spec}: {attr} is not an agent, an agent factory or a bot")
