"""The tests' plain helpers, one home each (fixtures live in tests/conftest.py):

- basics: TIMEOUT, paths, Worker, wait_until, free ports, tcp_pair, leak checks,
  FakeClock (standard library only),
- sessions: muxado session pairs, the raw peer and its frames,
- relay: sockets and streams, the service stand-ins, an in-process relay's
  insides, TLS with the test certificates,
- processes: child processes (Process, Starter) and MainRun,
- envs: what in-process relay tests build and tear down (Env and its kinds),
- logwatch: tcprelay's log messages, waited for,
- proxies: TCP proxies that make a path go silent,
- docs: the README's sections and option tables.
"""
