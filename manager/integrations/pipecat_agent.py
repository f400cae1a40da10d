"""A Pipecat pipeline as a call's agent, carried across live migrations.

A bot is a function ``make_pipeline(transport)`` that builds the call's
pipeline around a :class:`SplitRelayTransport` and returns either the
``Pipeline`` or a :class:`PipecatCall`, which also names what a migration
carries:

- ``context``: the ``LLMContext`` (its messages move, as Pipecat stores them);
- ``state``: any object with ``export_state() -> dict`` and
  ``import_state(dict)`` (turn counters, a processor's memory, ...).

The worker runs Pipecat's RTVI (processor and observer) as
:class:`CallRTVIProcessor`: a client that speaks RTVI gets ``bot-ready`` and
Pipecat's events, one that does not gets only the bot's messages, and the
RTVI handshake moves with the call.

:class:`PipecatAgent` is the :class:`Agent` the transceiver runs: it builds
the pipeline when the call starts, applies the imported state before the
first frame, and runs the pipeline in a ``PipelineWorker`` on a
``WorkerRunner`` that leaves the process's signals alone. What moves and
what restarts on migration is tabled in docs/pipecat.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.workers.runner import WorkerRunner

from manager.transceiver.agent import Agent, AgentSession

from .pipecat_rtvi import CallRTVIProcessor
from .pipecat_transport import SplitRelayTransport

log = logging.getLogger(__name__)

STATE_VERSION = 1


class Stateful(Protocol):
    def export_state(self) -> dict[str, Any]: ...
    def import_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class PipecatCall:
    """What a bot's factory returns when it has state to carry."""

    pipeline: Pipeline
    context: LLMContext | None = None
    state: Stateful | None = None
    params: PipelineParams | None = None


PipelineFactory = Callable[[SplitRelayTransport], "Pipeline | PipecatCall"]


class PipecatAgent(Agent):
    """Runs one call's Pipecat pipeline (one instance per call)."""

    def __init__(self, make_pipeline: PipelineFactory) -> None:
        self.make_pipeline = make_pipeline
        self.call: PipecatCall | None = None
        self.transport: SplitRelayTransport | None = None
        self.rtvi: CallRTVIProcessor | None = None
        self._imported: dict[str, Any] | None = None
        self._exported: dict[str, Any] = {}

    async def run(self, session: AgentSession) -> None:
        self.transport = SplitRelayTransport(session)
        built = self.make_pipeline(self.transport)
        self.call = built if isinstance(built, PipecatCall) else PipecatCall(pipeline=built)
        self.rtvi = CallRTVIProcessor()
        if self._imported is not None:
            self._apply(self._imported)
        # The worker prepends the processor, adds its observer and answers client-ready with
        # bot-ready (a bot that places its own RTVIProcessor and observer keeps them instead).
        worker = PipelineWorker(self.call.pipeline, params=self.call.params or PipelineParams(),
                                idle_timeout_secs=None, enable_rtvi=True, rtvi_processor=self.rtvi,
                                check_dangling_tasks=False)
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False, check_dangling_tasks=False)
        await runner.add_workers(worker)
        try:
            await runner.run()
        except asyncio.CancelledError:
            await runner.cancel()
            raise

    def export_state(self) -> dict[str, Any]:
        if self.call is None:
            return dict(self._imported or {})
        state: dict[str, Any] = {"version": STATE_VERSION}
        if self.call.context is not None:
            state["context"] = [dict(m) if isinstance(m, dict) else m for m in self.call.context.get_messages()]
        if self.call.state is not None:
            state["state"] = self.call.state.export_state()
        if self.rtvi is not None and (rtvi := self.rtvi.export_state()):
            state["rtvi"] = rtvi
        return state

    def import_state(self, state: dict[str, Any]) -> None:
        if state and state.get("version") not in (None, STATE_VERSION):
            raise ValueError(f"pipecat agent state version {state.get('version')!r} is not {STATE_VERSION}")
        self._imported = state or {}

    def _apply(self, state: dict[str, Any]) -> None:
        if self.call is None:
            return
        if self.call.context is not None and "context" in state:
            self.call.context.set_messages(list(state["context"]))
        if self.call.state is not None and "state" in state:
            self.call.state.import_state(state["state"])
        if self.rtvi is not None and "rtvi" in state:
            self.rtvi.import_state(state["rtvi"])


class PipecatBot:
    """A bot's pipeline factory, marked for ``--agent``: still callable as the factory,
    with ``agent_factory()`` giving the transceiver one :class:`PipecatAgent` a call."""

    def __init__(self, make_pipeline: PipelineFactory) -> None:
        self.make_pipeline = make_pipeline
        self.__doc__ = make_pipeline.__doc__

    def __call__(self, transport: SplitRelayTransport) -> Pipeline | PipecatCall:
        return self.make_pipeline(transport)

    def agent_factory(self) -> PipecatAgent:
        return PipecatAgent(self.make_pipeline)


def pipecat_bot(make_pipeline: PipelineFactory) -> PipecatBot:
    """Decorate a bot's ``make_pipeline(transport)`` so ``--agent FILE.py:make_pipeline`` runs it."""
    return PipecatBot(make_pipeline)
