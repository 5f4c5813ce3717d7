"""nat.py: the entry lifecycle and the half-open caps under any order of events (hypothesis
state machine), and the rewrite in both directions."""

import socket
import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tunnel.tun import packet as p
from tunnel.tun.nat import TRANSITIONS, Ev, NatError, State, TcpNat, Verdict

A = socket.inet_aton("10.119.73.1")  # TUN address, the listener's
P = socket.inet_aton("10.119.73.2")  # TUN peer
D = socket.inet_aton("198.18.0.1")  # the application's destination
L = socket.inet_aton("192.168.77.2")  # a second source (a LAN host in tun_allow)
LISTEN = 4321
APP_PORTS = st.integers(40000, 40005)
SOURCES = st.sampled_from([A, L])
PER_SOURCE = 2
MAX_HALF_OPEN = 3  # < 2 * PER_SOURCE, and < the 4 NAT ports: every limit is reached
HALF_OPEN = (State.OPENING, State.CONNECTING)  # the modem open or the handshake still pending

Key = tuple[bytes, int]  # the model's connection key: source address, port


def app_segment(
    sport: int, flags: int, seq: int = 0, ack: int = 0, data: bytes = b"", src: bytes = A
) -> bytearray:
    return bytearray(p.build_tcp(src, D, sport, 80, seq=seq, ack=ack, flags=flags, payload=data))


def listener_segment(nat_port: int, flags: int, seq: int = 0, ack: int = 0) -> bytearray:
    return bytearray(p.build_tcp(A, P, LISTEN, nat_port, seq=seq, ack=ack, flags=flags))


def addresses(buf: bytes) -> tuple[bytes, bytes, int, int]:
    ip = p.parse_ipv4(buf)
    seg = p.parse_tcp(ip.payload)
    return ip.src, ip.dst, seg.sport, seg.dport


def checks(buf: bytes) -> bool:
    ip = p.parse_ipv4(buf)
    pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, ip.proto, len(ip.payload))
    return p.checksum(buf[:20]) == 0 and p.checksum(pseudo, ip.payload) == 0


class Conn:
    """The test's model of one application connection."""

    def __init__(self) -> None:
        self.state = State.OPENING
        self.app_seq = 1000
        self.srv_seq = 5000
        self.app_fin = self.srv_fin = False
        self.app_fin_acked = self.srv_fin_acked = False
        self.reset = False

    @property
    def finished(self) -> bool:
        return self.reset or (self.app_fin_acked and self.srv_fin_acked)


class NatMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.nat = TcpNat(
            A,
            P,
            LISTEN,
            ports=range(20000, 20004),  # small: exhaustion happens
            per_source=PER_SOURCE,
            max_half_open=MAX_HALF_OPEN,
        )
        self.conns: dict[Key, Conn] = {}  # the model
        self.entries = {}  # Key -> Entry

    def live(self, *states: State) -> list[Key]:
        return sorted(k for k, c in self.conns.items() if c.state in states)

    def half_open(self, src: bytes | None = None) -> int:
        return sum(1 for k in self.live(*HALF_OPEN) if src is None or k[0] == src)

    def gone(self, key: Key) -> None:
        self.conns[key].state = State.GONE
        assert self.entries[key].state is State.GONE
        assert self.entries[key] in self.nat.removed

    @rule(src=SOURCES, port=APP_PORTS)
    def app_syn(self, src: bytes, port: int) -> None:
        key = (src, port)
        conn = self.conns.get(key)
        verdict, entry = self.nat.handle(app_segment(port, p.SYN, seq=999, src=src), 20)
        if conn is None or conn.state in (State.GONE, State.CLOSED):
            if conn is not None and conn.state is State.CLOSED:
                self.gone(key)  # reused: the old entry is over
            if self.half_open(src) >= PER_SOURCE:
                assert (verdict, entry) == (Verdict.BUSY, None)
                return
            if self.half_open() >= MAX_HALF_OPEN:
                assert (verdict, entry) == (Verdict.FULL, None)
                return
            if len(self.live(*HALF_OPEN, State.SPLICED, State.CLOSED)) == 4:
                assert (verdict, entry) == (Verdict.RESET, None)  # every NAT port is taken
                return
            assert verdict is Verdict.DIAL
            assert entry is not None
            self.conns[key] = Conn()
            self.entries[key] = entry
        elif conn.state is State.OPENING:
            assert verdict is Verdict.DROP  # held: no SYN reaches the listener before the modem
        else:
            assert verdict is Verdict.FORWARD

    @precondition(lambda self: self.live(State.OPENING))
    @rule(data=st.data(), ok=st.booleans())
    def modem_answers(self, data: st.DataObject, ok: bool) -> None:
        key = data.draw(st.sampled_from(self.live(State.OPENING)))
        entry = self.entries[key]
        if not ok:
            self.nat.open_failed(entry)
            self.gone(key)
            return
        syn = self.nat.opened(entry)
        assert syn is not None
        assert addresses(syn) == (P, A, entry.nat_port, LISTEN)
        assert checks(syn)
        self.conns[key].state = State.CONNECTING

    @precondition(lambda self: self.live(State.OPENING))
    @rule(data=st.data())
    def app_gives_up_while_opening(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.live(State.OPENING)))
        src, port = key
        verdict, _ = self.nat.handle(app_segment(port, p.RST | p.ACK, seq=1000, src=src), 20)
        assert verdict is Verdict.DROP
        self.gone(key)

    @precondition(lambda self: self.live(State.CONNECTING))
    @rule(data=st.data())
    def listener_accepts(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.live(State.CONNECTING)))
        assert self.nat.accepted(self.entries[key].nat_port) is self.entries[key]
        self.conns[key].state = State.SPLICED

    @precondition(lambda self: self.live(State.CONNECTING, State.SPLICED, State.CLOSED))
    @rule(data=st.data(), from_app=st.booleans(), kind=st.sampled_from(["data", "fin", "rst"]))
    def segment(self, data: st.DataObject, from_app: bool, kind: str) -> None:
        key = data.draw(st.sampled_from(self.live(State.CONNECTING, State.SPLICED, State.CLOSED)))
        (src, port), conn, entry = key, self.conns[key], self.entries[key]
        flags = p.ACK | {"data": 0, "fin": p.FIN, "rst": p.RST}[kind]
        if from_app:
            seq, ack = conn.app_seq, conn.srv_seq
            payload = b"x" if kind == "data" else b""
            buf = app_segment(port, flags, seq=seq, ack=ack, data=payload, src=src)
        else:
            seq, ack = conn.srv_seq, conn.app_seq
            buf = listener_segment(entry.nat_port, flags, seq=seq, ack=ack)
        verdict, _ = self.nat.handle(buf, 20)
        assert verdict is Verdict.FORWARD
        assert checks(buf)
        if from_app:
            assert addresses(buf) == (P, A, entry.nat_port, LISTEN)
        else:
            assert addresses(buf) == (D, src, 80, port)  # back to the application, as sent
        # The model: a FIN takes one sequence number; this segment acknowledges the other side.
        if from_app:
            conn.srv_fin_acked |= conn.srv_fin
            if kind == "data":
                conn.app_seq += 1
            elif kind == "fin" and not conn.app_fin:
                conn.app_fin, conn.app_seq = True, conn.app_seq + 1
        else:
            conn.app_fin_acked |= conn.app_fin
            if kind == "fin" and not conn.srv_fin:
                conn.srv_fin, conn.srv_seq = True, conn.srv_seq + 1
        if kind == "rst":
            conn.reset = True
        if (conn.state is State.CONNECTING and kind == "rst") or (
            conn.state is State.CLOSED and conn.finished
        ):
            self.gone(key)

    @precondition(lambda self: self.live(State.SPLICED))
    @rule(data=st.data())
    def daemon_closes_socket(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.live(State.SPLICED)))
        gone = self.nat.socket_closed(self.entries[key])
        assert gone is self.conns[key].finished
        if gone:
            self.gone(key)
        else:
            self.conns[key].state = State.CLOSED

    @precondition(lambda self: self.live(State.CONNECTING, State.CLOSED))
    @rule(data=st.data())
    def waited_too_long(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.live(State.CONNECTING, State.CLOSED)))
        self.nat.expire(self.entries[key])
        self.gone(key)

    @rule(src=SOURCES, port=APP_PORTS)
    def stray_segment_is_reset(self, src: bytes, port: int) -> None:
        if (src, port) in self.live(State.OPENING, State.CONNECTING, State.SPLICED, State.CLOSED):
            return
        verdict, _ = self.nat.handle(app_segment(port, p.ACK, seq=1, ack=1, src=src), 20)
        assert verdict is Verdict.RESET
        verdict, _ = self.nat.handle(app_segment(port, p.RST, seq=1, src=src), 20)
        assert verdict is Verdict.DROP

    @invariant()
    def tables_agree_with_the_model(self) -> None:
        live = {k: self.entries[k] for k in self.live(*(s for s in State if s is not State.GONE))}
        assert {e.key for e in live.values()} == set(self.nat.entries)
        assert {e.nat_port: e for e in live.values()} == self.nat.by_port
        for key, entry in self.entries.items():
            assert entry.state is self.conns[key].state

    @invariant()
    def half_open_counts_agree_with_the_model(self) -> None:
        expected = {src: self.half_open(src) for src in (A, L) if self.half_open(src)}
        assert self.nat.half_open == expected  # no zero counts left behind either
        assert self.nat.half_open_total == self.half_open()
        assert self.nat.half_open_total <= MAX_HALF_OPEN


TestNatMachine = NatMachine.TestCase
TestNatMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_quiet_connection_is_never_expired() -> None:
    """No idle expiry: an established entry only goes through its socket."""
    nat = TcpNat(A, P, LISTEN)
    _, entry = nat.handle(app_segment(40000, p.SYN), 20)
    assert entry is not None
    nat.opened(entry)
    nat.accepted(entry.nat_port)
    nat.expire(entry)  # the I/O side's timers never apply to a spliced entry
    assert entry.state is State.SPLICED
    assert len(nat) == 1


def test_peer_address_itself_is_reset() -> None:
    nat = TcpNat(A, P, LISTEN)
    syn = bytearray(p.build_tcp(A, P, 40000, 53, seq=0, ack=0, flags=p.SYN))
    assert nat.handle(syn, 20) == (Verdict.RESET, None)


def test_missing_transition_raises_naming_event_and_state() -> None:
    nat = TcpNat(A, P, LISTEN)
    _, entry = nat.handle(app_segment(40000, p.SYN), 20)
    assert entry is not None
    assert Ev.ACCEPTED not in TRANSITIONS[State.OPENING]
    with pytest.raises(NatError, match="ACCEPTED in state OPENING"):
        nat._fire(entry, Ev.ACCEPTED)
