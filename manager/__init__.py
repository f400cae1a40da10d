"""splitrelay manager: the userspace side of the relay (datapath loader, slow path, sessions, transceivers, migration, metrics)."""
