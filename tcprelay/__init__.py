"""tcprelay: a TCP relay in pure Python, speaking Go's muxado v2 wire protocol.

Services dial out to the relay and hold one multiplexed connection; the relay
gives each a public port and turns every client of that port into a stream.
"""

__version__ = "0.1.0"
