"""The relay's BPF C sources, shipped as package data of manager.relay.kernel.bpf
(pyproject.toml maps that package onto this directory) and found with
importlib.resources, so an installed relayd compiles the program it was built with."""
