"""Bridges to agent frameworks: each runs a framework's pipeline as a call's agent.

Optional: a bridge imports its framework, which the core never depends on
(``pip install splitrelay[pipecat]``).
"""
