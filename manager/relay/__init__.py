"""relayd: the relay's control plane (slow path, signaling, registry, migration)."""
