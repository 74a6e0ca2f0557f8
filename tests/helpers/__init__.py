"""The tests' plain helpers, one home each (fixtures live in tests/conftest.py):

- basics: TIMEOUT, paths, Worker, wait_until, free ports, tcp_pair, leak checks,
  FakeClock (standard library only),
- sessions: muxado session pairs and the raw peer,
- relay: sockets and streams, the service stand-in, child processes.
"""
