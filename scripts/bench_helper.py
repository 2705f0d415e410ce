#!/usr/bin/env python3
"""Helper of scripts/bench.sh (Python 3 standard library only).

    bench_helper.py seed DIR UID GID USERS PASSWORD BIG_USERS MESSAGES SIZE
        Writes DIR/users.passwd (user1..userUSERS, all with PASSWORD) and, for each user, a
        Maildir under DIR/mail/userN/Maildir: users 1..BIG_USERS get MESSAGES messages of
        SIZE bytes each, every other user one small message. Existing Maildirs are kept.
        Files are owned by UID:GID (the mail user). Written directly, before the first
        login, which is far faster than APPEND through IMAP.

    bench_helper.py report RESULTS.jsonl
        Prints a table: for each case, direct vs gateway (every repetition), the ratio
        gateway/direct, the gateway's CPU per unit of work and RSS per session, loadgen's
        own CPU, and the targets.
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


def seed(d, uid, gid, users, password, big_users, messages, size):
    uid, gid, users, big_users, messages, size = map(int, (uid, gid, users, big_users, messages, size))
    with open(os.path.join(d, "users.passwd"), "w") as f:
        for n in range(1, users + 1):
            f.write(f"user{n}:{{PLAIN}}{password}\n")
    mail = os.path.join(d, "mail")
    os.makedirs(mail, exist_ok=True)
    big_cache = {}
    stamp = int(time.time())
    for n in range(1, users + 1):
        user = f"user{n}"
        home = os.path.join(mail, user)
        maildir = os.path.join(home, "Maildir")
        if os.path.isdir(maildir):
            continue
        for p in (home, maildir) + tuple(os.path.join(maildir, s) for s in ("cur", "new", "tmp")):
            os.makedirs(p, exist_ok=True)
            os.chown(p, uid, gid)
        count, msize = (messages, size) if n <= big_users else (1, 2048)
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


TARGETS = {
    # case -> text shown in the "target" column
    "login-plain": "ratio >= 0.90, <= 0.35 ms CPU/login",
    "login-tls": "report",
    "fetch": "ratio >= 0.90, <= 0.5 ms CPU/MB",
    "latency": "+p50 <= 50 us, +p99 <= 250 us",
    "idle": "<= 8 KiB RSS/session, 0 errors",
}


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


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
                    f"  errors {d['errors']['count'] if d else '-'}/{g['errors']['count'] if g else '-'}"
                    f"  busy CPUs {fmt((d or {}).get('host_busy_cpus'), 1)}/{fmt((g or {}).get('host_busy_cpus'), 1)}"
                    f"   [{TARGETS.get(case, '')}]"
                )
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
            elif kind == "idle":
                for mode, r in (("direct", d), ("gateway", g)):
                    if not r:
                        continue
                    out.append(
                        f"{case:<14} run {rep}  {mode:<7} idling {r['sessions_idling']}/{r['sessions_requested']}"
                        f" (at hold end {r['sessions_idling_at_hold_end']}, closed ok {r['sessions_closed_ok']})"
                        f"  ramp {fmt(r['ramp_s'], 1)} s  errors {r['errors']['count']}"
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
    print("\n".join(out))


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "seed" and len(sys.argv) == 10:
        seed(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
