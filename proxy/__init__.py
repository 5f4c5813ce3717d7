"""SOCKS5 proxy: a sans-I/O RFC 1928/1929 state machine and a trio listener.

This package never imports `tunnel`: it declares the `Dialer` it needs (proxy.server) and the
daemon hands it one backed by the modem.
"""
