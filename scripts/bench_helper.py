#!/usr/bin/env python3
"""Helper of scripts/bench.sh (Python 3 standard library only).

    bench_helper.py seed DIR UID GID USERS SECRET BIG_USERS MESSAGES SIZE HASH
        Writes DIR/users.passwd (user1..userUSERS, all with SECRET, and huser1..huserUSERS,
        all with HASH; both as a passwd-file holds them: `{PLAIN}password`, or the password
        hashed as `doveadm pw` prints it) and, for
        each user, a Maildir under DIR/mail/USER/Maildir: users 1..BIG_USERS get MESSAGES
        messages of SIZE bytes each, every other user (husers too) one small message.
        Existing Maildirs are kept.
        Files are owned by UID:GID (the mail user). Written directly, before the first
        login, which is far faster than APPEND through IMAP.

    bench_helper.py report RESULTS.jsonl
        Prints a table: for each case, direct vs gateway (every repetition), the ratio
        gateway/direct, the gateway's CPU per unit of work and RSS per session, loadgen's
        own CPU, and the targets.

    bench_helper.py sample-start PEAKFILE "ADMIN_PORTS" "GATEWAY_PIDS"
    bench_helper.py sample PEAKFILE "ADMIN_PORTS" "GATEWAY_PIDS" "LOADGEN_PIDS"
        For idle runs split over several gateway processes: the RSS baseline, then the peak
        of concurrent logged-in sessions (imapgw_sessions_active summed over the admin
        ports) and the summed RSS at that peak, sampled every 0.5 s while loadgen runs.

    bench_helper.py combine LABEL PEAKFILE|- LOADGEN.json...
        One result line from the loadgen processes of a split idle run.
"""

import json
import os
import sys
import time
from collections import defaultdict


def message(size, n, user):
    head = (
        f"From: loadgen <bench@localhost>\n"
        f"To: {user}@localhost\n"
        f"Subject: benchmark message {n}\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\n"
        f"Message-ID: <bench.{user}.{n}@imap-gateway>\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n"
    ).encode()
    line = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789ab" * 1)[:76] + b"\n"
    body_len = max(0, size - len(head))
    body = line * (body_len // len(line)) + b"x" * (body_len % len(line))
    return head + body


def seed(d, uid, gid, users, secret, big_users, messages, size, hashed):
    uid, gid, users, big_users, messages, size = map(int, (uid, gid, users, big_users, messages, size))
    with open(os.path.join(d, "users.passwd"), "w") as f:
        for n in range(1, users + 1):
            f.write(f"user{n}:{secret}\n")
        for n in range(1, users + 1):
            f.write(f"huser{n}:{hashed}\n")
    mail = os.path.join(d, "mail")
    os.makedirs(mail, exist_ok=True)
    big_cache = {}
    stamp = int(time.time())
    # A huser's mailbox is an ordinary user's (one small message): a login costs the same but
    # for the password check.
    everyone = [(f"user{n}", n <= big_users, n) for n in range(1, users + 1)]
    everyone += [(f"huser{n}", False, n) for n in range(1, users + 1)]
    for user, big, n in everyone:
        home = os.path.join(mail, user)
        maildir = os.path.join(home, "Maildir")
        if os.path.isdir(maildir):
            continue
        for p in (home, maildir) + tuple(os.path.join(maildir, s) for s in ("cur", "new", "tmp")):
            os.makedirs(p, exist_ok=True)
            os.chown(p, uid, gid)
        count, msize = (messages, size) if big else (1, 2048)
        for i in range(1, count + 1):
            key = (msize, i)
            if key not in big_cache:
                big_cache[key] = message(msize, i, "user")
            raw = big_cache[key]
            lines = raw.count(b"\n")
            name = f"{stamp}.M{i}P{n}.bench,S={len(raw)},W={len(raw) + lines}"
            tmp = os.path.join(maildir, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(raw)
            os.chown(tmp, uid, gid)
            os.rename(tmp, os.path.join(maildir, "new", name))


LOGIN_TARGET = "ratio >= 0.90, <= 0.35 ms CPU/login"
TARGETS = {
    # case -> text shown in the "target" column
    "login-plain": LOGIN_TARGET,
    "login-hashed": LOGIN_TARGET,
    "login-tls": "report",
    "login-tls-resume": "report",
    "fetch": "ratio >= 0.90, <= 0.5 ms CPU/MB",
    "latency": "+p50 <= 50 us, +p99 <= 250 us",
    "idle": "<= 8 KiB RSS/session, 0 errors",
    "idle-tls": "report, next to idle",
}


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def per_backend(r, cpu_key):
    """The proxy's CPU per unit over the backends' CPU per unit in the same run. The machine's
    speed drifts by about 15 % between runs and every process drifts with it, so this ratio
    compares proxies measured minutes apart better than their CPU alone."""
    t, b = r.get(cpu_key), r.get(cpu_key.replace("target", "backend"))
    return t / b if t and b else None


def resumed(r):
    """The share of TLS handshakes that resumed a session, as text; empty without TLS."""
    if not r or not r.get("tls_handshakes"):
        return ""
    return f"  resumed {r['tls_resumed'] / r['tls_handshakes']:.0%}"


def peer_lines(case, rep, modes, d, metric, unit, cpu_key):
    """The other proxies of the same repetition, against the same direct run."""
    lines = []
    for peer, p in sorted(modes.items()):
        if peer in ("direct", "gateway"):
            continue
        pv = p.get(metric)
        dv = d.get(metric) if d else None
        lines.append(
            f"{'':<14}   peer {peer:<14} {fmt(pv, 1):>8} {unit:<9} ratio {fmt(pv / dv if pv and dv else None)}"
            f"  CPU {fmt(p.get(cpu_key), 3)} ms/{'MB' if unit == 'MB/s' else 'login'}"
            f"  Dovecot CPU {fmt(p.get(cpu_key.replace('target', 'backend')), 3)}"
            f" (proxy/Dovecot {fmt(per_backend(p, cpu_key))})"
            f"{resumed(p)}"
            f"  errors {p['errors']['count']}  busy CPUs {fmt(p.get('host_busy_cpus'), 1)}"
        )
    return lines


def report(path):
    rows = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    # label = case/mode/rep
    by_case = defaultdict(lambda: defaultdict(dict))
    order = []
    for r in rows:
        case, mode, rep = r.get("label", "?/?/1").split("/")
        if case not in order:
            order.append(case)
        by_case[case][rep][mode] = r
    out = []
    for case in order:
        kind = case.split("-")[0] if not case.startswith("latency") else "latency"
        for rep in sorted(by_case[case]):
            d = by_case[case][rep].get("direct")
            g = by_case[case][rep].get("gateway")
            if kind in ("login", "fetch"):
                metric = "mb_per_s" if kind == "fetch" else "ops_per_s"
                unit = "MB/s" if kind == "fetch" else "logins/s"
                cpu_key = "target_cpu_ms_per_mb" if kind == "fetch" else "target_cpu_ms_per_op"
                self_key = "self_cpu_ms_per_mb" if kind == "fetch" else "self_cpu_ms_per_op"
                dv = d.get(metric) if d else None
                gv = g.get(metric) if g else None
                ratio = gv / dv if dv and gv else None
                out.append(
                    f"{case:<14} run {rep}  direct {fmt(dv, 1):>8} {unit:<9} gateway {fmt(gv, 1):>8}"
                    f"  ratio {fmt(ratio)}  gw CPU {fmt(g.get(cpu_key) if g else None, 3)} ms/"
                    f"{'MB' if kind == 'fetch' else 'login'}  loadgen CPU {fmt(g.get(self_key) if g else None, 3)}"
                    f" (direct {fmt(d.get(self_key) if d else None, 3)})"
                    f"  Dovecot CPU {fmt((d or {}).get(cpu_key.replace('target', 'backend')), 3)}"
                    f" -> {fmt((g or {}).get(cpu_key.replace('target', 'backend')), 3)}"
                    f" (gateway/Dovecot {fmt(per_backend(g or {}, cpu_key))})"
                    f"{resumed(d).replace('resumed', 'resumed direct')}{resumed(g)}"
                    f"  errors {d['errors']['count'] if d else '-'}/{g['errors']['count'] if g else '-'}"
                    f"  busy CPUs {fmt((d or {}).get('host_busy_cpus'), 1)}/{fmt((g or {}).get('host_busy_cpus'), 1)}"
                    f"   [{TARGETS.get(case, '')}]"
                )
                out.extend(peer_lines(case, rep, by_case[case][rep], d, metric, unit, cpu_key))
            elif kind == "latency":
                for cmd in ("noop", "uid_fetch_flags"):
                    dl = (d or {}).get("latency_us", {}).get(cmd)
                    gl = (g or {}).get("latency_us", {}).get(cmd)
                    if not dl or not gl:
                        continue
                    add50 = gl["p50"] - dl["p50"]
                    add99 = gl["p99"] - dl["p99"]
                    out.append(
                        f"{case:<14} run {rep}  {cmd:<15} direct p50/p99/p999 {dl['p50']}/{dl['p99']}/{dl['p999']} us"
                        f"  gateway {gl['p50']}/{gl['p99']}/{gl['p999']} us  added p50 {add50:+d} us p99 {add99:+d} us"
                        f"  gw CPU {fmt(g.get('target_cpu_ms_per_op'), 4)} ms/cmd"
                        f"  loadgen {fmt(g.get('self_cpu_ms_per_op'), 4)} ms/cmd"
                        f"  errors {d['errors']['count']}/{g['errors']['count']}"
                        f"  busy CPUs {fmt(d.get('host_busy_cpus'), 1)}/{fmt(g.get('host_busy_cpus'), 1)}"
                    )
                    for peer, p in sorted(by_case[case][rep].items()):
                        pl = p.get("latency_us", {}).get(cmd) if peer not in ("direct", "gateway") else None
                        if pl:
                            out.append(
                                f"{'':<14}   peer {peer}: {pl['p50']}/{pl['p99']}/{pl['p999']} us"
                                f"  added p50 {pl['p50'] - dl['p50']:+d} us p99 {pl['p99'] - dl['p99']:+d} us"
                                f"  CPU {fmt(p.get('target_cpu_ms_per_op'), 4)} ms/cmd  errors {p['errors']['count']}"
                            )
            elif kind == "idle":
                for mode, r in (("direct", d), ("gateway", g)):
                    if not r:
                        continue
                    out.append(
                        f"{case:<14} run {rep}  {mode:<7} idling {r['sessions_idling']}/{r['sessions_requested']}"
                        f" (at hold end {r['sessions_idling_at_hold_end']}, closed ok {r['sessions_closed_ok']})"
                        f"  ramp {fmt(r['ramp_s'], 1)} s  errors {r['errors']['count']}"
                        + (
                            f"  peak {r['max_concurrent_sessions']} concurrent in {r['gateway_processes']} gateway processes"
                            if r.get("max_concurrent_sessions") is not None
                            else ""
                        )
                        + (f"  {r['loadgen_processes']} loadgen processes" if r.get("loadgen_processes") else "")
                        + (
                            f"  gw RSS {r['target_rss_kb_before']} -> {r['target_rss_kb_idle']} KiB"
                            f" = {fmt(r['rss_kb_per_session'])} KiB/session"
                            f"  gw CPU {fmt(r['target_cpu_ms_per_session_setup'], 3)} ms/session setup"
                            f", {fmt(r['target_cpu_s_hold'], 2)} s in hold"
                            if mode == "gateway"
                            else ""
                        )
                        + f"  loadgen {fmt(r['self_cpu_ms_per_session_setup'], 3)} ms/session"
                    )
                    for e in r["errors"]["first"][:3]:
                        out.append(f"{'':<22}error: {e}")
                # What TLS adds per idle session: the same count without TLS, same repetition.
                plain = by_case.get(case.replace("idle-tls-", "idle-", 1), {}).get(rep, {}).get("gateway")
                if case.startswith("idle-tls-") and g and plain:
                    t, p = g.get("rss_kb_per_session"), plain.get("rss_kb_per_session")
                    out.append(
                        f"{case:<14} run {rep}  gw RSS/session TLS {fmt(t)} KiB, plain {fmt(p)} KiB"
                        f", TLS adds {fmt(t - p if t is not None and p is not None else None)} KiB"
                        f"   [{TARGETS['idle-tls']}]"
                    )
    print("\n".join(out))


def gateway_state(admin_ports, pids):
    """Logged-in sessions (sum of imapgw_sessions_active over the admin ports) and the
    summed VmRSS in KiB of the gateway processes."""
    import urllib.request

    sessions = 0
    for port in admin_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("imapgw_sessions_active"):
                    sessions += int(float(line.rsplit(" ", 1)[1]))
    rss = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
    return sessions, rss


def sample_start(path, admin_ports, pids):
    """The gateways' state before the first session: the RSS baseline."""
    sessions, rss = gateway_state(admin_ports.split(), pids.split())
    json.dump({"rss_kb_before": rss, "sessions_before": sessions}, open(path, "w"))


def sample(path, admin_ports, pids, loadgen_pids):
    """Samples the gateways every half second while the loadgen processes run; keeps the
    peak of concurrent sessions and the RSS at that peak."""
    import time

    state = json.load(open(path))
    peak, rss_at_peak, samples = -1, None, 0
    def alive(p):
        # The shell may reap the process between any two reads here.
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    while any(alive(p) for p in loadgen_pids.split()):
        try:
            sessions, rss = gateway_state(admin_ports.split(), pids.split())
        except OSError:
            time.sleep(0.5)
            continue
        samples += 1
        if sessions > peak:
            peak, rss_at_peak = sessions, rss
        time.sleep(0.5)
    state.update({"max_concurrent_sessions": peak, "rss_kb_at_peak": rss_at_peak, "samples": samples})
    json.dump(state, open(path, "w"))


def combine(label, peak_path, files):
    """One result line from the loadgen processes of a split idle run."""
    rows = [json.loads(open(f).read()) for f in files]
    first_errors = [e for r in rows for e in r["errors"]["first"]][:10]
    out = {
        "label": label,
        "scenario": "idle",
        "loadgen_processes": len(rows),
        "target": ",".join(sorted({r["target"] for r in rows})),
        "pids": rows[0].get("pids"),
        "sessions_requested": sum(r["sessions_requested"] for r in rows),
        "sessions_idling": sum(r["sessions_idling"] for r in rows),
        "sessions_idling_at_hold_end": sum(r["sessions_idling_at_hold_end"] for r in rows),
        "sessions_closed_ok": sum(r["sessions_closed_ok"] for r in rows),
        "ramp_s": max(r["ramp_s"] for r in rows),
        "errors": {"count": sum(r["errors"]["count"] for r in rows), "first": first_errors},
        "self_cpu_ms_per_session_setup": max(r.get("self_cpu_ms_per_session_setup") or 0 for r in rows),
        "target_cpu_ms_per_session_setup": None,
        "target_cpu_s_hold": None,
        "target_rss_kb_before": None,
        "target_rss_kb_idle": None,
        "rss_kb_per_session": None,
    }
    if peak_path != "-":
        p = json.load(open(peak_path))
        out["gateway_processes"] = len(rows[0].get("pids") or [])
        out["max_concurrent_sessions"] = p["max_concurrent_sessions"]
        out["target_rss_kb_before"] = p["rss_kb_before"]
        out["target_rss_kb_idle"] = p["rss_kb_at_peak"]
        if p["max_concurrent_sessions"] > 0 and p["rss_kb_at_peak"] is not None:
            out["rss_kb_per_session"] = round(
                (p["rss_kb_at_peak"] - p["rss_kb_before"]) / p["max_concurrent_sessions"], 3
            )
    print(json.dumps(out))


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "seed" and len(sys.argv) == 11:
        seed(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "sample-start":
        sample_start(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "sample":
        sample(*sys.argv[2:])
    elif len(sys.argv) >= 5 and sys.argv[1] == "combine":
        combine(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
