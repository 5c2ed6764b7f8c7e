//! `ferry gen-key`, `ferry gen-certs`, `ferry report`, `ferry nics`.

use anyhow::Context;
use ferry_migration::nics;
use ferry_migration::report::RecordIn;

use super::args::{GenCertsArgs, GenKeyArgs, NicsArgs, ReportArgs};

pub fn gen_key(a: &GenKeyArgs) -> anyhow::Result<()> {
    ferry_transport::auth::generate_key_file(&a.file)?;
    super::out(&format!(
        "wrote {} (32 random bytes, base64, mode 0600): give it to ferry listen and ferry send as --auth-key-file, copied keeping its mode\n",
        a.file.display()
    ));
    Ok(())
}

pub fn gen_certs(a: &GenCertsArgs) -> anyhow::Result<()> {
    for f in super::certs::generate(&a.dir, a.ca.as_deref())? {
        super::out(&format!("wrote {}\n", f.display()));
    }
    Ok(())
}

pub fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let r = RecordIn::parse(&bytes).with_context(|| format!("{}", a.file.display()))?;
    super::out(&r.text_summary());
    if let Some(out) = &a.svg {
        std::fs::write(out, r.svg()).with_context(|| format!("cannot write {}", out.display()))?;
        super::out(&format!("drawn: {}\n", out.display()));
    }
    Ok(())
}

pub fn list_nics(a: &NicsArgs) -> anyhow::Result<()> {
    let all = nics::discover()?;
    super::out(&format!(
        "{:<16} {:<40} {:<6} {:>12} {:<10} migration\n",
        "interface", "address", "state", "speed", "rdma"
    ));
    for n in &all {
        let state = match (n.up, n.running) {
            (true, true) => "up",
            (true, false) => "no-carrier",
            _ => "down",
        };
        let usable = if !n.usable() {
            "no"
        } else if nics::allowed(&a.migration_network, n.addr) {
            "yes"
        } else {
            "not in --migration-network"
        };
        super::out(&format!(
            "{:<16} {:<40} {:<6} {:>12} {:<10} {usable}\n",
            n.name,
            format!("{}/{}", n.addr, n.prefix),
            state,
            n.speed_mbps
                .map(|m| format!("{m} Mbit/s"))
                .unwrap_or_else(|| "-".into()),
            n.rdma.as_deref().unwrap_or("-"),
        ));
    }
    Ok(())
}
