#!/usr/bin/env python3
"""QEMU driver for Ferry's real-guest tests and benchmarks (Python 3 standard library only).

Starts QEMU guests (optionally inside a network namespace: `ip netns exec`),
talks QMP to them over unix sockets in a work directory on the shared file
system (so it works across the namespaces of ci/netns-testbed.sh), reads
their serial logs, migrates them with QEMU's own migration (one connection
or multifd) and compares two guests' RAM byte for byte (`pmemsave`).

Three ways to use it:

* as a library: `from driver import Vm, ...` (ci/bench-relay.sh does);
* `driver.py migrate ...`: one whole migration between two new QEMUs, a JSON
  result on stdout (see `migrate --help`); exit 0 when it completed and
  checked out (see `problems`), 3 when not, 1 on a harness error;
* `driver.py serve WORKDIR`: a JSON-lines server on stdin/stdout for test
  programs in other languages (tests/src/qemu.rs): one request per line,
  `{"op": NAME, ...arguments}`, one answer per line, `{"ok": true, "result":
  ...}` or `{"ok": false, "error": "..."}`. The operations are the methods of
  `Server` below. Every QEMU it started is killed when stdin closes or the
  driver dies (PR_SET_PDEATHSIG), so a crashed test leaves nothing behind.

The guest is ci/qemu/build-guest.sh's: Debian's kernel, a busybox initramfs
and memcheck, which prints `pass K OK` / `pass K BAD` lines on the serial
console (ttyS0).
"""
import argparse
import ctypes
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PAGE = 4096
PASS_RE = re.compile(r"^pass (\d+) (OK|BAD)\b(.*)$")
# QEMU 7.2 caps migration at 128 MiB/s unless told otherwise; this is "no cap".
NO_CAP = 1 << 40
# Guest RAM: 1 GiB less 8 KiB, on purpose. QEMU 7.2 (Debian 12) syncs the
# migration dirty bitmap of a RAM block whose length is a multiple of 64 pages
# 64 bits at a time and then forgets to re-arm TCG's write tracking (a fix was
# posted upstream in February 2024: "migration: ... forgot to bring the TCG
# TLB up to date after clearing some of the dirty memory bitmap bits"): every
# store through a TLB entry made before that sync is lost to the migration, so
# the destination gets stale kernel and stack pages (measured here: 14 of 18
# running 1 GiB guests arrived with tens of words differing, and one crashed;
# see docs/relay.md). A length that is not such a multiple takes the
# page-by-page path, which does re-arm it. QEMU rounds -m to 8 KiB. The cost
# of that path grows with TCG's TLB, so keep memcheck's area small (64 MiB).
DEFAULT_MEM_KIB = 1024 * 1024 - 8


class DriverError(Exception):
    """Anything that went wrong, with a message that names it."""


def _die_with_parent():
    # preexec_fn: the child gets SIGKILL when this driver dies, whatever kills it.
    # `ip netns exec` execs QEMU, and the setting survives execve.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 (best effort: the driver still kills its VMs on exit)
        pass


def build_guest(outdir=None):
    """Builds (or reuses) the guest: returns {"kernel", "initrd", "memcheck"} paths."""
    cmd = ["bash", os.path.join(HERE, "build-guest.sh")] + ([outdir] if outdir else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise DriverError("build-guest.sh failed: " + (r.stderr or r.stdout).strip())
    out = dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)
    return {"kernel": out["KERNEL"], "initrd": out["INITRD"], "memcheck": out["MEMCHECK"]}


class Qmp:
    """One QMP connection: commands in order, events kept aside."""

    def __init__(self, path, timeout=30.0, alive=lambda: True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError as e:
                self.sock.close()
                if not alive():
                    raise DriverError(f"QMP socket {path}: the process exited") from e
                if time.monotonic() > deadline:
                    raise DriverError(f"QMP socket {path}: {e} after {timeout:.0f} s") from e
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise DriverError(f"QMP socket {path}: no greeting, got {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise DriverError("QMP connection closed (QEMU exited?)")
        return json.loads(line)

    def cmd(self, name, timeout=None, **args):
        """Runs one command and returns its "return" value; raises on "error"."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            self.file.write(json.dumps(msg) + "\n")
            self.file.flush()
            while True:
                r = self._read()
                if "event" in r:
                    self.events.append(r)
                elif "return" in r:
                    return r["return"]
                elif "error" in r:
                    raise DriverError(f"QMP {name}: {r['error'].get('desc', r['error'])}")
        except (OSError, ValueError) as e:
            raise DriverError(f"QMP {name}: {e}") from e
        finally:
            if timeout is not None:
                self.sock.settimeout(30.0)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Vm:
    """One QEMU process (x86_64 q35, TCG, one vCPU, serial console to a file)."""

    def __init__(self, name, workdir, mem_kib=DEFAULT_MEM_KIB, netns=None, guest=None, memcheck=None,
                 incoming=False, paused=False, loaders=(), accel="tcg", append=(), extra=()):
        """
        guest: build_guest()'s dict to boot the real guest; None for no kernel
               (a machine that never runs, with content from `loaders`).
        memcheck: memcheck options for the kernel command line, e.g. {"mib": 256}.
        incoming: start with `-incoming defer` (a destination: call incoming()).
        paused: start with -S (not running until cont(); a destination started
                so stays paused after the migration, for RAM comparisons).
        loaders: (file, guest physical address) pairs loaded raw into RAM.
        """
        self.name, self.workdir, self.mem_kib, self.netns = name, workdir, mem_kib, netns
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.serial_path = os.path.join(workdir, f"{name}.serial")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        for p in (self.qmp_path, self.serial_path):
            if os.path.exists(p):
                os.unlink(p)
        argv = ["qemu-system-x86_64", "-name", name, "-machine", "q35", "-accel", accel,
                "-m", f"{mem_kib}k", "-smp", "1", "-nodefaults", "-display", "none",
                "-no-reboot", "-serial", f"file:{self.serial_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if guest:
            append = ["console=ttyS0", "quiet", "panic=-1"] + list(append)
            append += [f"memcheck.{k.replace('_', '-')}={v}" for k, v in (memcheck or {}).items()]
            argv += ["-kernel", guest["kernel"], "-initrd", guest["initrd"],
                     "-append", " ".join(append)]
        for path, addr in loaders:
            argv += ["-device", f"loader,file={path},addr={addr:#x},force-raw=on"]
        if paused:
            argv.append("-S")
        if incoming:
            argv += ["-incoming", "defer"]
        argv += list(extra)
        self.argv = (["ip", "netns", "exec", netns] if netns else []) + argv
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr, preexec_fn=_die_with_parent)
        try:
            self.qmp = Qmp(self.qmp_path, alive=self.alive)
        except DriverError as e:
            self.kill()
            raise DriverError(f"{name}: QEMU did not come up: {e}; {self.stderr_text()}") from e
        self.started = time.monotonic()

    # -- state

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def cpu_s(self):
        """User + system CPU seconds QEMU used so far (all its threads; `ip netns
        exec` execs QEMU in place, so the child is QEMU), or None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cmd(self, name, **args):
        if not self.alive():
            raise DriverError(f"{self.name}: QEMU exited ({self.proc.returncode}): {self.stderr_text()}")
        return self.qmp.cmd(name, **args)

    def status(self):
        """query-status's status ("running", "paused", "postmigrate", "inmigrate", ...),
        or "exited(N)" when QEMU is gone."""
        if not self.alive():
            return f"exited({self.proc.returncode})"
        try:
            return self.qmp.cmd("query-status")["status"]
        except DriverError:
            if not self.alive():
                return f"exited({self.proc.returncode})"
            raise

    # -- serial console

    def serial(self):
        try:
            with open(self.serial_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def passes(self):
        """memcheck's complete pass lines so far: [(K, "OK"|"BAD", rest)]."""
        text = self.serial()
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines = lines[:-1]  # a line still being written
        out = []
        for line in lines:
            m = PASS_RE.match(line.strip("\r"))
            if m:
                out.append((int(m.group(1)), m.group(2), m.group(3).strip()))
        return out

    def wait_serial(self, pattern, timeout):
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial()
            m = rx.search(text)
            if m:
                return m.group(0)
            if not self.alive():
                raise DriverError(f"{self.name}: QEMU exited before /{pattern}/; serial: {text[-2000:]!r}")
            if time.monotonic() > deadline:
                raise DriverError(f"{self.name}: no /{pattern}/ on the serial console in {timeout:.0f} s; "
                                  f"serial: {text[-2000:]!r}")
            time.sleep(0.1)

    def wait_passes(self, count, timeout, after=0):
        """Waits until `count` passes numbered above `after` were printed; returns them
        (a BAD one returns at once: the caller checks)."""
        deadline = time.monotonic() + timeout
        while True:
            new = [p for p in self.passes() if p[0] > after]
            if len(new) >= count or any(p[1] == "BAD" for p in new):
                return new
            if not self.alive():
                raise DriverError(f"{self.name}: QEMU exited after {len(new)} of {count} passes; "
                                  f"serial: {self.serial()[-2000:]!r}; {self.stderr_text()}")
            if time.monotonic() > deadline:
                raise DriverError(f"{self.name}: {len(new)} of {count} passes after pass {after} "
                                  f"in {timeout:.0f} s; serial: {self.serial()[-2000:]!r}")
            time.sleep(0.1)

    # -- migration

    def set_migration(self, multifd=0, max_bandwidth=NO_CAP, downtime_limit_ms=None,
                      capabilities=None):
        """Migration settings, on the source and on the destination alike (before
        migrate / incoming). multifd: number of multifd channels (0: one connection)."""
        caps = dict(capabilities or {})
        caps["multifd"] = multifd > 0
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": k, "state": bool(v)} for k, v in caps.items()])
        params = {"max-bandwidth": int(max_bandwidth)}
        if multifd:
            params["multifd-channels"] = int(multifd)
        if downtime_limit_ms is not None:
            params["downtime-limit"] = int(downtime_limit_ms)
        self.cmd("migrate-set-parameters", **params)

    def incoming(self, uri):
        """Destination: start listening on uri (e.g. tcp:10.200.0.2:4444)."""
        self.cmd("migrate-incoming", uri=uri)

    def migrate(self, uri):
        self.migrate_started = time.monotonic()
        self.cmd("migrate", uri=uri)

    def query_migrate(self):
        return self.cmd("query-migrate")

    def wait_migration(self, timeout, poll=0.05):
        """Polls query-migrate until completed / failed / cancelled; returns it,
        with "wall_ms" (migrate command to the end, as seen here) added."""
        deadline = time.monotonic() + timeout
        while True:
            q = self.query_migrate()
            if q.get("status") in ("completed", "failed", "cancelled"):
                q["wall_ms"] = round((time.monotonic() - self.migrate_started) * 1000)
                return q
            if time.monotonic() > deadline:
                raise DriverError(f"{self.name}: migration not finished in {timeout:.0f} s: {q}")
            time.sleep(poll)

    def cancel_migration(self):
        self.cmd("migrate_cancel")

    def cont(self):
        self.cmd("cont")

    def stop(self):
        self.cmd("stop")

    def pmemsave(self, path):
        """Writes all guest RAM (physical 0 .. mem) to path, a file or a FIFO (the
        guest should be paused)."""
        self.qmp.cmd("pmemsave", timeout=300, val=0, size=self.mem_kib << 10, filename=path)

    # -- end

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.qmp_close()

    def qmp_close(self):
        q = getattr(self, "qmp", None)
        if q:
            q.close()

    def quit(self):
        if self.alive():
            try:
                self.qmp.cmd("quit", timeout=5)
            except DriverError:
                pass
        self.kill()


def compare_streams(fa, fb, page=PAGE, chunk=1 << 20, max_ranges=16):
    """Compares two binary streams (RAM dumps) in lock step; page-level detail
    only where a chunk differs. Differing pages are reported as coalesced
    [start, end) address ranges (the first max_ranges of them)."""
    size_a = size_b = differing = 0
    ranges = []
    while True:
        x, y = fa.read(chunk), fb.read(chunk)  # buffered: whole chunks until the end
        if not x and not y:
            break
        if x != y:
            for i in range(0, max(len(x), len(y)), page):
                if x[i:i + page] != y[i:i + page]:
                    differing += 1
                    at = size_a + i
                    if ranges and ranges[-1][1] == at:
                        ranges[-1][1] = at + page
                    elif len(ranges) < max_ranges:
                        ranges.append([at, at + page])
        size_a += len(x)
        size_b += len(y)
    return {"equal": differing == 0 and size_a == size_b, "bytes_a": size_a, "bytes_b": size_b,
            "differing_pages": differing,
            "differing_ranges": [f"{a:#x}-{b:#x}" for a, b in ranges]}


def compare_ram(a, b, workdir):
    """Byte comparison of two paused guests' RAM (physical 0 .. mem): both
    `pmemsave` at once into FIFOs read here in lock step, so no dump touches
    the disk."""
    t = time.monotonic()
    errors = []
    fifos = []
    for vm in (a, b):
        fifo = os.path.join(workdir, f"{vm.name}.ram.fifo")
        if os.path.exists(fifo):
            os.unlink(fifo)
        os.mkfifo(fifo)
        fifos.append(fifo)

    def save(vm, fifo):
        try:
            vm.pmemsave(fifo)
        except DriverError as e:
            errors.append(f"{vm.name}: {e}")
            # Let the reader's open() return (and read EOF): a writer that closes.
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threads = [threading.Thread(target=save, args=(vm, f)) for vm, f in zip((a, b), fifos)]
    for th in threads:
        th.start()
    try:
        with open(fifos[0], "rb") as fa, open(fifos[1], "rb") as fb:
            for f in (fa, fb):
                try:  # a larger pipe: fewer switches between QEMU's 4 KiB writes and us
                    fcntl.fcntl(f.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
                except OSError:
                    pass
            r = compare_streams(fa, fb)
    finally:
        for th in threads:
            th.join()
        for f in fifos:
            os.unlink(f)
    if errors:
        raise DriverError("pmemsave: " + "; ".join(errors))
    r["ms"] = round((time.monotonic() - t) * 1000)
    return r


def migration_summary(q):
    """The figures of a finished query-migrate that the tests and benchmarks use."""
    ram = q.get("ram", {})
    return {
        "status": q.get("status"),
        "error": q.get("error-desc"),
        "total_ms": q.get("total-time"),
        "downtime_ms": q.get("downtime"),
        "setup_ms": q.get("setup-time"),
        "wall_ms": q.get("wall_ms"),
        "transferred": ram.get("transferred"),
        "normal_bytes": ram.get("normal-bytes"),
        "duplicate_pages": ram.get("duplicate"),
        "multifd_bytes": ram.get("multifd-bytes"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "mbps": ram.get("mbps"),
    }


# ------------------------------------------------------------------- migrate

def wait_both(src, dst, timeout, poll=0.005):
    """Polls the source's query-migrate until it ends and the destination's status until
    it leaves "inmigrate" (it finishes loading after the source completes: whatever was
    still on the way to it then). Returns the source's last query-migrate (with wall_ms)
    and the destination's end in ms after the migrate command, or None when the source's
    migration did not complete or the destination had not ended 60 s after it did."""
    deadline = time.monotonic() + timeout
    q = dst_end = None
    while True:
        if q is None:
            s = src.query_migrate()
            # A query right at the end can say "completed" before it has the
            # total time (0): ask again.
            done = s.get("status") in ("failed", "cancelled") or (
                s.get("status") == "completed" and s.get("total-time"))
            if done:
                s["wall_ms"] = round((time.monotonic() - src.migrate_started) * 1000)
                q = s
                deadline = min(deadline, time.monotonic() + 60)
        if dst_end is None and dst.status() != "inmigrate":
            dst_end = round((time.monotonic() - src.migrate_started) * 1000)
        if q is not None and (dst_end is not None or q.get("status") != "completed"):
            return q, dst_end
        if time.monotonic() > deadline:
            if q is not None:
                return q, None
            raise DriverError(f"{src.name}: migration not finished in {timeout:.0f} s: {q}")
        time.sleep(poll)


def migrate_once(workdir, uri, incoming=None, src_ns=None, dst_ns=None, mem_kib=DEFAULT_MEM_KIB,
                 running=True, memcheck=None, loaders=(), multifd=0, compare=True,
                 passes_after=2, timeout=300, guest=None, log=None):
    """One whole migration between two new QEMUs; returns a result dict.

    running: boot the real guest (memcheck) and migrate it while it runs;
             else a paused machine (-S) whose RAM is `loaders`' content.
    uri:      where the source migrates to; incoming: where the destination
             listens (default: uri).
    compare:  the destination starts paused (-S) and both RAMs are compared
             after the migration; then the destination is resumed.
    passes_after: memcheck passes the destination must print after resuming.
    """
    log = log or (lambda *_: None)
    res = {"uri": uri, "incoming": incoming or uri, "multifd": multifd, "running": running}
    t0 = time.monotonic()
    if running and guest is None:
        guest = build_guest()
    src = dst = None
    try:
        src = Vm("src", workdir, mem_kib, netns=src_ns, guest=guest if running else None,
                 memcheck=memcheck, paused=not running, loaders=loaders)
        if running:
            # Boot until memcheck checked its memory twice, so the migration
            # copies a guest that is dirtying and verifying.
            src.wait_passes(2, timeout=180)
            res["boot_ms"] = round((time.monotonic() - t0) * 1000)
            log(f"src booted in {res['boot_ms']} ms")
        dst = Vm("dst", workdir, mem_kib, netns=dst_ns, guest=guest if running else None,
                 memcheck=memcheck, incoming=True, paused=compare or not running)
        for vm in (src, dst):
            vm.set_migration(multifd=multifd)
        dst.incoming(incoming or uri)
        src_before = src.passes()
        cpu0 = (src.cpu_s(), dst.cpu_s())
        src.migrate(uri)
        q, res["dst_end_ms"] = wait_both(src, dst, timeout)
        res.update(migration_summary(q))
        # What each QEMU spent from the migrate command to both ends: on a
        # host whose cores the QEMUs share with the relays, part of the budget.
        for vm, c0, key in ((src, cpu0[0], "src_qemu_cpu_s"), (dst, cpu0[1], "dst_qemu_cpu_s")):
            c1 = vm.cpu_s()
            res[key] = None if c0 is None or c1 is None else round(c1 - c0, 3)
        log(f"migration {res['status']} in {res['total_ms']} ms (downtime {res['downtime_ms']} ms, "
            f"destination loaded {res['dst_end_ms']} ms after the migrate command)")
        if res["status"] != "completed":
            res["src_status"] = src.status()
            res["dst_status"] = dst.status()
            return res
        res["src_status"] = src.status()
        res["dst_status_after_migration"] = dst.status()
        if compare:
            res["ram"] = compare_ram(src, dst, workdir)
            log(f"RAM compared in {res['ram']['ms']} ms: equal={res['ram']['equal']}")
            if running:
                dst.cont()
        res["dst_status"] = dst.status()
        if running:
            last_src = max([p[0] for p in src.passes()] or [0])
            res["src_passes_before_migrate"] = len(src_before)
            res["src_last_pass"] = last_src
            res["src_bad"] = [p for p in src.passes() if p[1] == "BAD"]
            try:
                new = dst.wait_passes(passes_after, timeout=120) if passes_after else dst.passes()
            except DriverError as e:
                res["dst_error"] = str(e)
                new = dst.passes()
            res["dst_passes"] = [f"{k} {s}" for k, s, _ in new]
            res["dst_first_pass"] = new[0][0] if new else None
            res["dst_bad"] = [p for p in new if p[1] == "BAD"]
            res["dst_rebooted"] = "ferry-guest: init" in dst.serial()
        return res
    finally:
        res["harness_ms"] = round((time.monotonic() - t0) * 1000)
        for vm in (src, dst):
            if vm:
                vm.quit()


def problems(res, passes_after=2):
    """What is wrong with migrate_once's result: [] when the migration completed,
    the RAMs compared equal, and (a running guest) the destination runs on with
    only OK passes, continuing the source's count without a reboot."""
    out = []
    if res.get("status") != "completed":
        out.append(f"migration {res.get('status')}: {res.get('error')}")
        return out
    ram = res.get("ram")
    if ram is not None and not ram["equal"]:
        out.append(f"RAM differs: {ram['differing_pages']} pages, at {ram['differing_ranges']}")
    if res.get("running"):
        if res.get("dst_status") != "running":
            out.append(f"destination is {res.get('dst_status')}, not running")
        if res.get("src_bad") or res.get("dst_bad"):
            out.append(f"memcheck BAD: source {res.get('src_bad')}, destination {res.get('dst_bad')}")
        if res.get("dst_error"):
            out.append(res["dst_error"])
        if len(res.get("dst_passes", [])) < passes_after:
            out.append(f"destination printed {len(res.get('dst_passes', []))} passes, wanted {passes_after}")
        first, last = res.get("dst_first_pass"), res.get("src_last_pass")
        # A line cut by the switchover can hide one pass number.
        if first is not None and last is not None and not last < first <= last + 2:
            out.append(f"destination pass numbers do not continue the source's: {last} then {first}")
        if res.get("dst_rebooted"):
            out.append("the destination guest booted again")
    return out


# ------------------------------------------------------------------- serve

class Server:
    """JSON-lines operations for tests written in other languages. VMs are named."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.vms = {}
        self.guest = None

    def _vm(self, name):
        if name not in self.vms:
            raise DriverError(f"no VM named {name!r} (have {sorted(self.vms)})")
        return self.vms[name]

    def op_build_guest(self):
        self.guest = build_guest()
        return self.guest

    def op_start(self, name, mem_kib=DEFAULT_MEM_KIB, netns=None, boot=True, memcheck=None, incoming=False,
                 paused=False, loaders=()):
        if name in self.vms:
            raise DriverError(f"a VM named {name!r} exists")
        if boot and self.guest is None:
            self.guest = build_guest()
        self.vms[name] = Vm(name, self.workdir, mem_kib, netns=netns,
                            guest=self.guest if boot else None, memcheck=memcheck,
                            incoming=incoming, paused=paused,
                            loaders=[(p, a) for p, a in loaders])
        return {"pid": self.vms[name].proc.pid, "argv": self.vms[name].argv}

    def op_status(self, name):
        return self._vm(name).status()

    def op_serial(self, name):
        return self._vm(name).serial()

    def op_passes(self, name):
        return [[k, s, rest] for k, s, rest in self._vm(name).passes()]

    def op_wait_passes(self, name, count, timeout=120, after=0):
        return [[k, s, rest] for k, s, rest in self._vm(name).wait_passes(count, timeout, after)]

    def op_wait_serial(self, name, pattern, timeout=60):
        return self._vm(name).wait_serial(pattern, timeout)

    def op_set_migration(self, name, multifd=0, max_bandwidth=NO_CAP, downtime_limit_ms=None,
                         capabilities=None):
        self._vm(name).set_migration(multifd, max_bandwidth, downtime_limit_ms, capabilities)

    def op_incoming(self, name, uri):
        self._vm(name).incoming(uri)

    def op_migrate(self, name, uri):
        self._vm(name).migrate(uri)

    def op_query_migrate(self, name):
        return self._vm(name).query_migrate()

    def op_wait_migration(self, name, timeout=300):
        return migration_summary(self._vm(name).wait_migration(timeout))

    def op_qmp(self, name, command, arguments=None):
        return self._vm(name).cmd(command, **(arguments or {}))

    def op_cont(self, name):
        self._vm(name).cont()

    def op_compare_ram(self, a, b):
        return compare_ram(self._vm(a), self._vm(b), self.workdir)

    def op_kill(self, name):
        vm = self.vms.pop(name)
        vm.kill()
        return vm.proc.returncode

    def op_quit(self, name):
        vm = self.vms.pop(name)
        vm.quit()

    def op_alive(self, name):
        return self._vm(name).alive()

    def close(self):
        for vm in self.vms.values():
            vm.kill()
        self.vms.clear()


def serve(workdir):
    srv = Server(workdir)
    signal.signal(signal.SIGTERM, lambda *_: (srv.close(), sys.exit(0)))
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                op = req.pop("op")
                fn = getattr(srv, "op_" + op, None)
                if fn is None:
                    raise DriverError(f"unknown op {op!r}")
                reply = {"ok": True, "result": fn(**req)}
            except (DriverError, TypeError, KeyError, ValueError, OSError) as e:
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        srv.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="JSON-lines server on stdin/stdout")
    s.add_argument("workdir")
    m = sub.add_parser("migrate", help="one migration between two new QEMUs, JSON result on stdout")
    m.add_argument("--workdir", required=True)
    m.add_argument("--uri", required=True, help="where the source migrates to, e.g. tcp:10.200.0.2:4444")
    m.add_argument("--incoming", help="where the destination listens (default: --uri)")
    m.add_argument("--src-ns")
    m.add_argument("--dst-ns")
    m.add_argument("--mem-kib", type=int, default=DEFAULT_MEM_KIB,
                   help="guest RAM in KiB (default: 1 GiB less 8 KiB, see DEFAULT_MEM_KIB)")
    m.add_argument("--paused-image", metavar="FILE",
                   help="a paused machine (-S, no kernel) with FILE loaded raw at --image-addr, "
                        "instead of the running memcheck guest")
    m.add_argument("--image-addr", type=lambda x: int(x, 0), default=0x10000000)
    m.add_argument("--memcheck-mib", type=int, default=64)
    m.add_argument("--multifd", type=int, default=0)
    m.add_argument("--no-compare", action="store_true")
    m.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.workdir)
        return 0
    running = a.paused_image is None
    res = migrate_once(a.workdir, a.uri, a.incoming, a.src_ns, a.dst_ns, a.mem_kib,
                       running=running, memcheck={"mib": a.memcheck_mib} if running else None,
                       loaders=[] if running else [(a.paused_image, a.image_addr)],
                       multifd=a.multifd, compare=not a.no_compare, timeout=a.timeout,
                       log=lambda msg: print(f"driver: {msg}", file=sys.stderr))
    res["problems"] = problems(res)
    print(json.dumps(res))
    return 3 if res["problems"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DriverError as e:
        print(f"driver: {e}", file=sys.stderr)
        sys.exit(1)
