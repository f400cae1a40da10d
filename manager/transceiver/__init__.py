"""Transceiver: owns the WebRTC state (ICE, DTLS, SRTP) of its calls, next to the agent."""
