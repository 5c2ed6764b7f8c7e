#!/usr/bin/env python3
"""Shows what QEMU's migration does on the wire, for the relay's design (docs/relay.md).

    python3 ci/qemu/trace-channels.py [--multifd N] [--return-path] [--main-last]

Migrates a paused 256 MiB guest (16 MiB of random content) between two QEMUs
over loopback through a logging TCP proxy, and prints, per connection in
accept order: when it was accepted, its first bytes in each direction, and
when each direction ended (EOF) after how many bytes; then what each QEMU
says. The proxy connects to the destination in accept order, one connect at
a time, as `ferry listen` will; with --main-last it connects the first
accepted connection (the main channel) last instead, to show that QEMU 7.2's
destination takes the first connection it accepts as the main channel.
No root needed. Figures quoted in docs/relay.md come from this script.
"""
import argparse
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import driver  # noqa: E402

T0 = time.monotonic()
LOCK = threading.Lock()


def log(*parts):
    with LOCK:
        print(f"{time.monotonic() - T0:7.3f}s", *parts, flush=True)


def pump(conn, a, b, way):
    first, total = None, 0
    while True:
        try:
            buf = a.recv(1 << 16)
        except OSError as e:
            log(f"conn {conn} {way}: read error {e}")
            break
        if not buf:
            break
        if first is None:
            first = buf[:8]
            log(f"conn {conn} {way}: first bytes {first.hex(' ')}")
        total += len(buf)
        try:
            b.sendall(buf)
        except OSError as e:
            log(f"conn {conn} {way}: write error {e}")
            break
    log(f"conn {conn} {way}: EOF after {total} bytes")
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def proxy(listener, upstream, expect, main_last):
    accepted = []
    for n in range(expect):
        c, _ = listener.accept()
        log(f"conn {n}: accepted")
        accepted.append(c)
        if not main_last:
            start(n, c, upstream)
    if main_last:
        for n in list(range(1, expect)) + [0]:
            start(n, accepted[n], upstream)


def start(n, c, upstream):
    u = socket.create_connection(upstream)
    log(f"conn {n}: connected to the destination")
    threading.Thread(target=pump, args=(n, c, u, "src->dst"), daemon=True).start()
    threading.Thread(target=pump, args=(n, u, c, "dst->src"), daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--multifd", type=int, default=0)
    ap.add_argument("--return-path", action="store_true")
    ap.add_argument("--main-last", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fqt", dir="/tmp") as work:
        img = os.path.join(work, "random.img")
        with open(img, "wb") as f:
            f.write(os.urandom(16 << 20))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dst_port = s.getsockname()[1]
        expect = 1 + a.multifd
        threading.Thread(target=proxy, daemon=True,
                         args=(listener, ("127.0.0.1", dst_port), expect, a.main_last)).start()
        src = driver.Vm("src", work, 256 * 1024, paused=True, loaders=[(img, 0x1000000)])
        dst = driver.Vm("dst", work, 256 * 1024, paused=True, incoming=True)
        try:
            for vm in (src, dst):
                vm.set_migration(multifd=a.multifd, capabilities={"return-path": a.return_path})
            dst.incoming(f"tcp:127.0.0.1:{dst_port}")
            src.migrate(f"tcp:127.0.0.1:{listener.getsockname()[1]}")
            r = driver.migration_summary(src.wait_migration(60))
            time.sleep(1)
            log(f"source QEMU: {r['status']} in {r['total_ms']} ms, {r['transferred']} bytes"
                + (f" ({r['error']})" if r["error"] else ""))
            log(f"destination QEMU: {dst.status()}" +
                (f"; it said: {dst.stderr_text()}" if dst.stderr_text() else ""))
        finally:
            src.quit()
            dst.quit()


if __name__ == "__main__":
    main()
