"""relayctl and relayd command-line entry points."""
