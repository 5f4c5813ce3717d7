"""Numbers the UC20 TCP/IP manual fixes: id ranges, data limits, maximum response times.

Shared by the driver and the emulator (the only thing they share besides error codes), so each
value cites the manual section it comes from.
"""

from typing import Final

# 2.4: "<connectID> Integer type, socket service index, range is 0-11"
CONNECT_IDS: Final = range(12)
# 2.1: "<contextID> Integer type, context ID, range is 1-16"
CONTEXT_IDS: Final = range(1, 17)
# 2.7: "The maximum length of sending data is 1460"
MAX_SEND_LEN: Final = 1460
# 2.8: "<read_length> The maximum length of data to be retrieved, the range is 0-1500"
MAX_READ_LEN: Final = 1500
# 2.1 gives <APN>, <username> and <password> as "String type" and no length. An APN is at most
# 100 octets (3GPP TS 23.003 9.1); user name and password are held to 127, the builders' limit
# from the start, far above any operator's. Only printable ASCII without a quote reaches the
# modem, so characters are bytes here. The config checks use these same builders.
MAX_APN_LEN: Final = 100
MAX_USERNAME_LEN: Final = 127
MAX_PASSWORD_LEN: Final = 127
# AT+CPIN="<pin>" (3GPP TS 27.007 8.3); a PIN is 4 to 8 decimal digits (ETSI TS 102 221 9.5.1).
PIN_LENGTHS: Final = range(4, 9)
# 2.10: "<timeout> ... range: 1-255, default: 1"; "<pingnum> ... Range: 1-10. Default: 4"
PING_TIMEOUTS: Final = range(1, 256)
PING_COUNTS: Final = range(1, 11)
# 2.4 / 2.16.2
ACCESS_BUFFER: Final = 0
ACCESS_PUSH: Final = 1
ACCESS_TRANSPARENT: Final = 2

# Maximum response times, seconds. 1.1 Notes: every command 60 s unless stated;
# 2.2 QIACT 150 s; 2.3 QIDEACT 40 s; 2.4 the +QIOPEN URC 150 s; 2.5 QICLOSE 10 s;
# 2.11 QNTP 125 s; 2.13 QIDNSGIP 60 s.
DEFAULT_TIMEOUT: Final = 60.0
TIMEOUTS: Final[dict[str, float]] = {
    "QIACT": 150.0,
    "QIDEACT": 40.0,
    "QIOPEN": 150.0,
    "QICLOSE": 10.0,
    "QNTP": 125.0,
    "QIDNSGIP": 60.0,
}

# Ctrl-Z ends variable-length QISEND input, ESC cancels it (2.7).
CTRL_Z: Final = 0x1A
ESC: Final = 0x1B
