"""splitrelay: the relay (relayd), the transceiver, the protocol they share, and the lab."""
