"""Command builders: exact lines, and refusal of anything that could escape its field."""

import pytest

from tunnel.at import commands as c


def test_lines_match_the_manual() -> None:
    assert c.qicsgp(1, "UNINET", "", "", c.Auth.PAP).line == b'AT+QICSGP=1,1,"UNINET","","",1'
    assert c.qiact(1).line == b"AT+QIACT=1"
    assert c.qiopen(1, 0, "TCP", "61.190.19.174", 8705, 0, 1).line == (
        b'AT+QIOPEN=1,0,"TCP","61.190.19.174",8705,0,1'
    )
    assert c.qisend(0, 5).line == b"AT+QISEND=0,5"
    assert c.qisend(2, 10, ("10.7.89.10", 6969)).line == b'AT+QISEND=2,10,"10.7.89.10",6969'
    assert c.qird(11, 1500).line == b"AT+QIRD=11,1500"
    assert c.qiswtmd(3, 0).line == b"AT+QISWTMD=3,0"
    assert c.qping(1, "www.example.test").line == b'AT+QPING=1,"www.example.test",1,4'
    assert c.qntp(1, "202.120.2.101", 123).line == b'AT+QNTP=1,"202.120.2.101",123'


def test_timeouts_follow_the_manual() -> None:
    assert c.qiact(1).timeout == 150
    assert c.qideact(1).timeout == 40
    # 2.5: the modem may itself take the full 10 s; we allow it some slack on top.
    assert c.qiclose(0).timeout == 10 + c.QICLOSE_SLACK
    assert c.at().timeout == 60


def test_password_is_masked_in_shown_text() -> None:
    cmd = c.qicsgp(1, "apn", "user", "s3cret", c.Auth.CHAP)
    assert b"s3cret" in cmd.line
    assert "s3cret" not in str(cmd)
    assert "***" in str(cmd)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ('evil"host', "quote"),
        ("a,b", "comma"),
        ("a\rAT+CFUN=1,1", "CR"),
        ("a\nb", "LF"),
        ("a;b", "semicolon"),
        ("", "empty"),
        ("a b", "0x20"),
        ("caf\u00e9.test", "0xe9"),
        ("x" * 254, "longer"),
        ("::g", "not a host"),
    ],
)
def test_host_injection_refused(host: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        c.qiopen(1, 0, "TCP", host, 80)
    with pytest.raises(ValueError, match=reason):
        c.qidnsgip(1, host)


def test_ipv6_literal_and_underscore_names_allowed() -> None:
    assert c.qiopen(1, 0, "TCP", "::1", 80).line.endswith(b'"::1",80,0,1')
    assert c.check_host("_srv.my_host.test") == "_srv.my_host.test"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: c.qiopen(1, 12, "TCP", "a.test", 80), "connect_id"),
        (lambda: c.qiopen(0, 1, "TCP", "a.test", 80), "context_id"),
        (lambda: c.qiopen(1, 1, "TCP", "a.test", 65536), "remote_port"),
        (lambda: c.qiopen(1, 1, "TCPX", "a.test", 80), "service"),
        (lambda: c.qisend(0, 1461), "length"),
        (lambda: c.qisend(0, 0), "length"),
        (lambda: c.qird(0, 1501), "length"),
        (lambda: c.qicsgp(1, 'a"', "", "", c.Auth.NONE), "apn"),
        (lambda: c.qicsgp(1, "a", "u\r", "", c.Auth.NONE), "username"),
        (lambda: c.qicsgp(1, "a", "u", 'p"', c.Auth.NONE), "password"),
        (lambda: c.cpin_enter("12a4"), "pin"),
    ],
)
def test_out_of_range_refused(call, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        call()


def test_response_parsers() -> None:
    assert c.parse_qiact([b'+QIACT: 1,1,1,"10.7.157.1"']) == {
        1: c.ContextState(1, True, "10.7.157.1")
    }
    assert c.parse_qiact([]) == {}
    st = c.parse_qistate([b'+QISTATE: 0,"TCP","61.190.19.174",8705,0,2,1,0,1,"usbmodem"'])
    assert st == [c.SocketState(0, "TCP", "61.190.19.174", 8705, 0, 2, 1, 1)]
    assert c.parse_cpin([b"+CPIN: SIM PIN"]) == "SIM PIN"
    assert c.parse_creg([b"+CGREG: 0,5"]) == 5
    assert c.parse_csq([b"+CSQ: 24,99"]) == (24, 99)
    assert c.parse_cops([b'+COPS: 0,0,"Op, Inc",2']) == "Op, Inc"
    assert c.parse_qigeterror([b"+QIGETERROR: 558, invalid parameters"]) == (
        558,
        "invalid parameters",
    )
    assert c.parse_qisend_query([b"+QISEND: 10,10,0"]) == (10, 10, 0)
    assert c.parse_qird_query([b"+QIRD: 5,5,0"]) == (5, 5, 0)
