"""Human-readable output of the control commands (`--json` prints the answer as it came)."""

from typing import Any


def human(command: str, answer: dict[str, Any]) -> str:
    return {"status": _status, "ping": _ping, "ntp": _ntp, "resolve": _resolve}[command](answer)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


_REG = {0: "not searching", 1: "home", 2: "searching", 3: "denied", 4: "unknown", 5: "roaming"}


def _status(a: dict[str, Any]) -> str:
    lines = [f"state: {a['state']}   uptime: {_duration(a['uptime'])}"]
    if a.get("problem"):
        lines.append(f"problem: {a['problem']}")
    m = a["modem"]
    if m.get("available"):
        sig = m.get("signal") or {}
        dbm = sig.get("dbm")
        signal = f"{dbm} dBm (rssi {sig.get('rssi')})" if dbm is not None else "unknown"
        reg = m.get("registration")
        lines.append(
            f"modem: {m.get('model') or '?'} {m.get('revision') or ''} on {a['device']}"
            f"{' (emulated)' if a.get('emulated') else ''}"
        )
        lines.append(
            f"  signal {signal}, operator {m.get('operator') or '?'}, "
            f"registration {_REG.get(reg, '?') if reg is not None else '?'}"
        )
        lines.append(
            f"  line in {_size(m['bytes_in'])} out {_size(m['bytes_out'])}, "
            f"{m['commands']} commands, {m['timeouts']} timeouts, "
            f"{m['garbage_lines']} garbage lines, {m['restarts_seen']} RDY seen"
        )
        if m.get("held_reads") or m.get("hold_misses"):
            lines.append(f"  held reads {m.get('held_reads', 0)}, {m.get('hold_misses', 0)} missed")
    else:
        lines.append(f"modem: not available (device {a['device']})")
    modems = a.get("modems") or []
    if len(modems) > 1:
        lines.append(
            f"modems: {sum(m['state'] == 'serving' for m in modems)}/{len(modems)} serving"
        )
        for m in modems:
            signal = f"{m['signal_dbm']} dBm" if m.get("signal_dbm") is not None else "?"
            backoff = (
                f", next restart in {_duration(m['next_restart_in'])}"
                if m.get("next_restart_in") is not None
                else ""
            )
            lines.append(
                f"  {m['name']}: {m['state']} for {_duration(m['in_state_for'])} on {m['device']}"
                f", ip {m['ip'] or '-'}, signal {signal}, operator {m.get('operator') or '?'}, "
                f"{m['flows']} flows, {m['restarts']} restarts{backoff}"
            )
    c = a["context"]
    lines.append(f"context {c['id']}: apn {c['apn'] or '(none)'}, ip {c['ip'] or '-'}")
    lines.append(f"socks: {', '.join(a['socks'])}")
    r = a["restarts"]
    line = f"restarts: {r['consecutive_failures']} consecutive failure(s)"
    if r.get("next_restart_in") is not None:
        line += f", next restart in {_duration(r['next_restart_in'])}"
    lines.append(line)
    for h in r["history"][-3:]:
        lines.append(f"  {h['at']} attempt {h['attempt']}: {h['reason']}")
    flows = a["flows"]
    lines.append(f"flows: {len(flows)}")
    for f in flows:
        lines.append(
            f"  id {f['id']:>2} {f['kind']} {f['dst']} up {_size(f['up'])} "
            f"down {_size(f['down'])} age {_duration(f['age'])}"
        )
    for fw in a.get("forwards", ()):
        where = f"id {fw['id']}" if fw["id"] is not None else fw["state"]
        allow = ", ".join(fw["allow"]) or "everyone"
        line = (
            f"forward modem port {fw['modem_port']} -> {fw['to']}: {fw['state']} ({where}), "
            f"allow {allow}, {len(fw['connections'])} open, {fw['accepted']} accepted, "
            f"{fw['refused']} refused"
        )
        lines.append(line + (f": {fw['detail']}" if fw["detail"] else ""))
        for c in fw["connections"]:
            lines.append(
                f"  id {c['id']:>2} from {c['remote']} up {_size(c['up'])} "
                f"down {_size(c['down'])} age {_duration(c['age'])}"
            )
    d = a["dns"]
    lines.append(f"dns: {d['lookups']} lookups, {d['cache_hits']} cache hits")
    tun = a.get("tun")
    if tun:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(tun["refused"].items())) or "none"
        lines.append(
            f"tun {tun['name']}: {'up' if tun['up'] else 'down'} {tun['address']} peer "
            f"{tun['peer']} mtu {tun['mtu']} routes {', '.join(tun['routes']) or 'none'}"
        )
        lines.append(
            f"  nat entries {tun['nat_entries']}, tcp opened {tun['tcp_opened']} refused "
            f"{tun['tcp_refused']}, up {_size(tun['bytes_up'])} down {_size(tun['bytes_down'])}, "
            f"udp flows {tun['udp_flows']}, dns queries {tun['dns_queries']}, refused: {refused}"
        )
    return "\n".join(lines)


def _ping(a: dict[str, Any]) -> str:
    lines = [f"PING {a['host']} through the modem"]
    for i, r in enumerate(a["replies"], 1):
        if r is None:
            lines.append(f"  #{i}: timeout")
        else:
            lines.append(f"  #{i}: reply from {r['address']} time={r['time_ms']} ms ttl={r['ttl']}")
    s = a["summary"]
    lines.append(
        f"{s['sent']} sent, {s['received']} received, {s['lost']} lost; "
        f"rtt min/avg/max {s['min_ms']}/{s['avg_ms']}/{s['max_ms']} ms"
    )
    return "\n".join(lines)


def _ntp(a: dict[str, Any]) -> str:
    return f"{a['server']}: {a['time']}"


def _resolve(a: dict[str, Any]) -> str:
    return f"{a['name']}: {' '.join(a['addresses'])} (ttl {a['ttl']} s)"
