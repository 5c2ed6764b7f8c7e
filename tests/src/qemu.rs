//! Real Linux guests under QEMU, migrated by QEMU itself, for the relay's
//! end-to-end tests: a client of `ci/qemu/driver.py serve`, which starts
//! QEMUs (in network namespaces when asked), speaks QMP to them, reads their
//! serial consoles and compares their RAM. One request per line on the
//! driver's stdin, one answer per line on its stdout; the operations are the
//! `op_*` methods of `Server` in `ci/qemu/driver.py`.
//!
//! The guest (`ci/qemu/build-guest.sh`): Debian's kernel, a busybox
//! initramfs and `memcheck`, which keeps rewriting and checking its memory
//! and prints `pass K OK` / `pass K BAD` on the serial console. The driver
//! kills every QEMU it started when its stdin closes (this client's drop)
//! or when it dies.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn ci_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/qemu")
}

/// Why real-guest tests cannot run here, if they cannot: a missing tool
/// (QEMU, python3, a Debian kernel, busybox-static, gcc, cpio), named with
/// what installs it.
pub fn missing_prerequisite() -> Option<String> {
    let runs = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    for (cmd, arg) in [
        ("qemu-system-x86_64", "--version"),
        ("python3", "--version"),
        ("gcc", "--version"),
        ("cpio", "--version"),
    ] {
        if !runs(cmd, arg) {
            return Some(format!(
                "`{cmd}` is missing (bash ci/softroce/install.sh installs it)"
            ));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox is missing (busybox-static)".into());
    }
    let kernel = std::fs::read_dir("/boot").ok().and_then(|d| {
        d.filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    });
    if kernel.is_none() {
        return Some("no kernel in /boot (linux-image-amd64)".into());
    }
    None
}

/// A running `driver.py serve`.
#[derive(Debug)]
pub struct QemuDriver {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl QemuDriver {
    /// Starts the driver with `workdir` for QMP sockets, serial logs and
    /// RAM-dump FIFOs (keep it short: unix socket paths are limited to 107
    /// bytes), and builds the guest (cached under target/).
    pub fn start(workdir: &Path) -> QemuDriver {
        let mut child = Command::new("python3")
            .arg(ci_dir().join("driver.py"))
            .arg("serve")
            .arg(workdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3 ci/qemu/driver.py serve");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut d = QemuDriver {
            child,
            stdin,
            stdout,
            stderr: Some(stderr),
            started: Instant::now(),
        };
        d.ok("build_guest", serde_json::json!({}));
        d
    }

    /// One operation: its result, or the driver's error message.
    pub fn call(&mut self, op: &str, args: Value) -> Result<Value, String> {
        let mut req = match args {
            Value::Object(m) => m,
            Value::Null => serde_json::Map::new(),
            other => panic!("driver arguments must be an object, not {other}"),
        };
        req.insert("op".into(), Value::String(op.into()));
        let line = serde_json::to_string(&req).unwrap();
        let stdin = self.stdin.as_mut().expect("driver stdin open");
        if writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .is_err()
        {
            return Err(format!("driver gone: {}", self.finish()));
        }
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer).unwrap_or(0) == 0 {
            return Err(format!("driver gone: {}", self.finish()));
        }
        let v: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("driver answered {answer:?}: {e}"));
        if v["ok"] == Value::Bool(true) {
            Ok(v["result"].clone())
        } else {
            Err(v["error"].as_str().unwrap_or("?").to_string())
        }
    }

    /// One operation that must succeed: its result (panics naming the
    /// operation and the driver's error).
    pub fn ok(&mut self, op: &str, args: Value) -> Value {
        match self.call(op, args) {
            Ok(v) => v,
            Err(e) => panic!("QEMU driver {op}: {e}"),
        }
    }

    /// Seconds since the driver started (for the phase timings the tests print).
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Closes the driver's stdin (it kills its QEMUs and exits) and returns
    /// what it wrote on stderr.
    fn finish(&mut self) -> String {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for QemuDriver {
    fn drop(&mut self) {
        self.finish();
    }
}
