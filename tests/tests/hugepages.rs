//! `ferry listen --hugepages`: the destination's guest memory from the
//! kernel's 2 MiB hugetlb pool. Needs root to size the pool (CI runs as
//! root); each test grows the pool by what it needs and gives it back.

use std::sync::Mutex;
use std::time::Duration;

use ferry_tests::{assert_guest_kept, key_file, listen, migrate_ok, send, summary, KEY};

const POOL_FILE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// (pages, free, reserved) of the 2 MiB pool.
fn pool() -> Option<(u64, u64, u64)> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("{POOL_FILE}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((
        read("nr_hugepages")?,
        read("free_hugepages")?,
        read("resv_hugepages")?,
    ))
}

/// The pool grown (if needed) so that `pages` are free and not reserved,
/// held by one test at a time; shrunk back by what it added when dropped.
struct Pool {
    added: u64,
    _one: std::sync::MutexGuard<'static, ()>,
}

static ONE: Mutex<()> = Mutex::new(());

impl Pool {
    fn with_free(pages: u64) -> Pool {
        let one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let (total, free, resv) = pool().expect("this kernel has a 2 MiB hugetlb pool");
        let short = pages.saturating_sub(free.saturating_sub(resv));
        std::fs::write("/proc/sys/vm/nr_hugepages", (total + short).to_string())
            .expect("sysctl vm.nr_hugepages (root)");
        let (now, free, resv) = pool().unwrap();
        let p = Pool {
            added: now - total,
            _one: one,
        };
        assert!(
            free.saturating_sub(resv) >= pages,
            "the kernel found only {} free huge pages",
            free.saturating_sub(resv)
        );
        p
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some((total, _, _)) = pool() {
            let _ = std::fs::write(
                "/proc/sys/vm/nr_hugepages",
                total.saturating_sub(self.added).to_string(),
            );
        }
    }
}

#[test]
fn a_dirtying_guest_lands_in_hugetlb_memory_on_every_landing_path() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    // 48 MiB guests, one at a time: 24 pages, and room to spare.
    let _pool = Pool::with_free(32);
    for option in [
        &["--performance-option", "tcp", "--plaintext"][..],
        &["--performance-option", "tcp"][..],
        &["--performance-option", "compression"][..],
    ] {
        let json = dir.path().join("summary.json");
        let mut args = vec![
            "--memory",
            "48MiB",
            "--dirty-rate",
            "16MB/s",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(option);
        let listen_args: &[&str] = if option.contains(&"--plaintext") {
            &["--hugepages", "--plaintext"]
        } else {
            &["--hugepages"]
        };
        let m = migrate_ok(&key, listen_args, &args, Duration::from_secs(120));
        assert!(
            m.dest
                .all()
                .contains("guest memory from the 2 MiB hugetlb pool"),
            "{option:?}: {}",
            m.dest.all()
        );
        let s = summary(&json);
        assert_eq!(s["digest_verified"], true, "{option:?}");
        assert!(
            m.dest.stdout.contains("pattern pages verified"),
            "{option:?}: {}",
            m.dest.all()
        );
    }
}

#[test]
fn a_guest_the_pool_cannot_hold_is_refused_saying_so_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let pool_guard = Pool::with_free(8);
    let (_, free, resv) = pool().unwrap();
    let room = free.saturating_sub(resv);
    // One 2 MiB page more than the pool has free (zero pages: the source
    // never writes its memory before the destination refuses).
    let memory = format!("{}MiB", (room + 1) * 2);
    let (dest, addr) = listen(&key, &["--hugepages", "--plaintext"]);
    let out = send(
        addr,
        &key,
        &[
            "--memory",
            &memory,
            "--zero-fraction",
            "1",
            "--dirty-rate",
            "0",
            "--performance-option",
            "tcp",
            "--plaintext",
        ],
        Duration::from_secs(60),
    );
    assert_guest_kept(&out);
    for said in [
        "memory limit",
        "hugetlb pool",
        &format!("the guest needs {} huge pages", room + 1),
        "sysctl vm.nr_hugepages",
    ] {
        assert!(out.stderr.contains(said), "{said}: {}", out.all());
    }
    let dest = dest.wait(Duration::from_secs(30));
    assert!(!dest.panicked(), "{}", dest.all());
    // The pool is as it was: nothing reserved by the refused migration.
    assert_eq!(pool().unwrap().2, resv);
    drop(pool_guard);
}
