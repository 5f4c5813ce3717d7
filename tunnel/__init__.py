"""uc20-tunnel: the modem side of the PPP-less network adapter.

Everything that speaks AT to a Quectel UC20 (and EC2x/BG9x) lives here, plus the TUN
interface, the daemon, the CLI and the built-in emulator.
"""
