#!/usr/bin/env python3
"""Gateway memory per idle session.

Starts a Dovecot tuned for many sessions and the gateway (a release build), then opens idle
sessions through the gateway in steps (LOGIN + SELECT INBOX + IDLE, spread over many users and
source addresses 127.1.x.y) and prints the gateway's VmRSS after each step:

    per session = (RSS with C sessions - RSS before any session) / C
    marginal    = (RSS at this step - RSS at the previous step) / (sessions added)

Run as root on Debian 12 with dovecot-imapd installed (the mail processes run as the system
user `imapgwtest`, which the integration tests create):

    cargo build --release
    python3 tools/idle_rss.py --steps 1000,5000,9000

Options: --dovecot-extra appends settings to dovecot.conf (';' separates lines), --wrap runs
the gateway under a profiler, --keep keeps the work directory (logs, configs).

A process may hold at most `ulimit -n` descriptors: the gateway needs two per session, so C
stays below half of that; the client side is spread over several worker processes.
"""

import argparse
import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PER_WORKER = 4000
LOGIN_CONCURRENCY = 32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


def wait_greeting(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"* OK"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"nothing greets on port {port}")


def dovecot_conf(d, port, uid, gid):
    return f"""
base_dir = {d}/run
state_dir = {d}/state
instance_name = idle-rss-{os.getpid()}
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
log_path = {d}/dovecot.log
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:~/Maildir:LAYOUT=fs
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users.passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = 5000
  process_limit = 64
}}
# One imap process serves many sessions (all users share one mail uid). Dovecot's other way,
# imap_hibernate_timeout moving IDLE sessions into imap-hibernate, needs an inotify instance
# per session to hand over, and the per-uid inotify limit (fs.inotify.max_user_instances,
# 128 by default) stops it: --dovecot-extra "imap_hibernate_timeout = 5s" with a raised limit.
service imap {{
  unix_listener imap-master {{
    user = dovecot
  }}
  service_count = 0
  client_limit = 1000
  process_limit = 64
}}
service imap-hibernate {{
  unix_listener imap-hibernate {{
    mode = 0666
  }}
  client_limit = 5000
}}
service anvil {{
  client_limit = 5000
}}
service auth {{
  client_limit = 5000
}}
default_vsz_limit = 0
mail_max_userip_connections = 100000
"""


def start_dovecot(root, users, extra):
    uid = pwd.getpwnam("imapgwtest").pw_uid
    gid = pwd.getpwnam("imapgwtest").pw_gid
    port = free_port()
    os.chmod(root, 0o755)
    for sub in ("run", "state", "mail"):
        os.makedirs(f"{root}/{sub}")
    with open(f"{root}/users.passwd", "w") as f:
        for i in range(users):
            f.write(f"u{i}:{{PLAIN}}pw\n")
            home = f"{root}/mail/u{i}"
            os.makedirs(home)
            os.chown(home, uid, gid)
    with open(f"{root}/dovecot.conf", "w") as f:
        f.write(dovecot_conf(root, port, uid, gid) + extra)
    log = open(f"{root}/dovecot.out", "w")
    proc = subprocess.Popen(
        ["/usr/sbin/dovecot", "-F", "-c", f"{root}/dovecot.conf"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    wait_greeting(port)
    return proc, port


def start_gateway(root, binary, backend_port, wrap, log_level):
    port = free_port()
    with open(f"{root}/routing.toml", "w") as f:
        f.write(f'default_pool = ["dc"]\n\n[[backends]]\nname = "dc"\n'
                f'address = "127.0.0.1:{backend_port}"\ntls = "none"\ntrusted = true\n')
    with open(f"{root}/gateway.toml", "w") as f:
        f.write(f'routing_table = "routing.toml"\n\n[[listeners]]\nname = "plain"\n'
                f'address = "127.0.0.1:{port}"\nmode = "plain"\nallow_plaintext_auth = true\n\n'
                f'[admin]\nenabled = false\n\n[log]\nlevel = "{log_level}"\n')
    log = open(f"{root}/gateway.log", "w")
    proc = subprocess.Popen(wrap + [binary, "-c", f"{root}/gateway.toml", "run"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    wait_greeting(port)
    return proc, port


# --- worker: holds sessions -------------------------------------------------------------

async def expect(reader, tag):
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line.startswith(tag):
            if not line.startswith(tag + b" OK") and tag != b"+":
                raise ConnectionError(line.decode(errors="replace").strip())
            return


async def one_session(port, n, users, held, sem):
    src = f"127.1.{(n // 250) % 250 + 1}.{n % 250 + 1}"
    async with sem:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(src, 0), limit=4096)
        await reader.readline()
        writer.write(f"a LOGIN u{n % users} pw\r\n".encode())
        await expect(reader, b"a")
        writer.write(b"b SELECT INBOX\r\n")
        await expect(reader, b"b")
        writer.write(b"c IDLE\r\n")
        await expect(reader, b"+")
    held.append((reader, writer))


async def worker(port, base, users):
    held = []
    sem = asyncio.Semaphore(LOGIN_CONCURRENCY)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    n = base
    while True:
        cmd = (await stdin.readline()).decode().split()
        if not cmd or cmd[0] == "quit":
            break
        count = int(cmd[1])
        results = await asyncio.gather(
            *(one_session(port, n + i, users, held, sem) for i in range(count)),
            return_exceptions=True)
        n += count
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            print(f"error {len(errors)} {errors[0]!r}", flush=True)
        else:
            print(f"ok {len(held)}", flush=True)
    for _, w in held:
        w.close()


def gateway_pid(wrapper, root):
    """The gateway's pid: `wrapper` itself, or its process group's member running our config."""
    conf = f"{root}/gateway.toml".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == wrapper:
            continue
        try:
            if os.getpgid(int(d)) != wrapper:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if conf in args and not any(b"heaptrack" in a or b"valgrind" in a for a in args):
            return int(d)
    return wrapper


# --- main --------------------------------------------------------------------------------

def settle(pid, seconds):
    """Waits `seconds`, then until VmRSS stops moving."""
    time.sleep(seconds)
    last = rss_kib(pid)["VmRSS"]
    while True:
        time.sleep(1)
        now = rss_kib(pid)["VmRSS"]
        if abs(now - last) <= 64:
            return rss_kib(pid)
        last = now


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", default="target/release/imap-gateway")
    ap.add_argument("--steps", default="1000,5000")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--dovecot-extra", default="", help="appended to dovecot.conf")
    ap.add_argument("--wrap", default="",
                    help="run the gateway under this, e.g. 'heaptrack -o /tmp/ht' "
                         "(RSS then includes the profiler's overhead)")
    ap.add_argument("--log-level", default="warn", help="the gateway's [log] level")
    ap.add_argument("--hold", type=float, default=0, help="seconds to hold the last step")
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(worker(*args.worker))
        return

    steps = [int(s) for s in args.steps.split(",")]
    root = tempfile.mkdtemp(prefix="idle-rss-")
    dovecot, dport = start_dovecot(root, args.users, args.dovecot_extra.replace(";", "\n"))
    gateway = None
    workers = []
    try:
        gateway, gport = start_gateway(root, os.path.abspath(args.gateway), dport, args.wrap.split(), args.log_level)
        pid = gateway_pid(gateway.pid, root)
        before = settle(pid, 1)
        print(f"gateway pid {pid}, before: {before}", flush=True)
        total = 0
        prev_rss = before["VmRSS"]
        prev_total = 0
        for target in steps:
            t0 = time.time()
            while total < target:
                if not workers or workers[-1][1] >= PER_WORKER:
                    p = subprocess.Popen(
                        [sys.executable, __file__, "--worker", str(gport),
                         str(len(workers) * PER_WORKER), str(args.users)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    workers.append([p, 0])
                p, have = workers[-1]
                add = min(target - total, PER_WORKER - have)
                p.stdin.write(f"open {add}\n")
                p.stdin.flush()
                answer = p.stdout.readline().strip()
                if not answer.startswith("ok"):
                    raise SystemExit(f"worker: {answer!r}")
                workers[-1][1] += add
                total += add
            opened = time.time() - t0
            now = settle(pid, 8)
            per = (now["VmRSS"] - before["VmRSS"]) / total
            marginal = (now["VmRSS"] - prev_rss) / (total - prev_total)
            print(f"C={total}: VmRSS {now['VmRSS']} KiB (anon {now['RssAnon']}), "
                  f"threads {now['Threads']}, opened in {opened:.1f}s; "
                  f"per session {per:.2f} KiB, marginal {marginal:.2f} KiB", flush=True)
            prev_total = total
            prev_rss = now["VmRSS"]
        time.sleep(args.hold)
    finally:
        for p, _ in workers:
            try:
                p.stdin.write("quit\n")
                p.stdin.flush()
            except OSError:
                pass
        for p, _ in workers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if gateway:
            # The gateway itself: with --wrap it is a child of the wrapper, which must live
            # on to write its results.
            os.kill(gateway_pid(gateway.pid, root), signal.SIGTERM)
            try:
                gateway.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(gateway.pid, signal.SIGKILL)
        os.killpg(dovecot.pid, signal.SIGTERM)
        dovecot.wait(timeout=30)
        if args.keep:
            print(f"work directory: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
