//! `ferry`: live-migrate guest memory.
//!
//! * `ferry listen`: destination daemon.
//! * `ferry send`: source, with a built-in synthetic guest.
//! * `ferry demo`: both ends in one process over loopback.
//! * `ferry nics`: this host's interfaces as multichannel sees them.
//! * `ferry gen-key`: a new pre-shared key file for `--auth-key-file`.
//! * `ferry gen-certs`: a test CA and host certificates for `--tls-dir`.
//!
//! The parts live in `cli/`: `args` (every flag), `listen`, `send` (send
//! and demo), `tools` (nics, report, gen-key, gen-certs), `progress`, `summary`,
//! `units`.

use clap::{Parser, Subcommand};
use cli::args::{DemoArgs, GenCertsArgs, GenKeyArgs, ListenArgs, NicsArgs, ReportArgs, SendArgs};

mod cli;

/// Ferry: live-migration memory transport.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: live-migrate guest memory between hosts (pre-copy over TCP, compression or RDMA, on every NIC at once)",
    long_about = None,
    after_help = cli::help::TOP_EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: cli::logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Destination daemon: accept incoming migrations.
    #[command(after_help = cli::help::LISTEN_EXAMPLES)]
    Listen(ListenArgs),
    /// Source: migrate a synthetic guest to a destination.
    #[command(after_help = cli::help::SEND_EXAMPLES)]
    Send(SendArgs),
    /// Both ends in one process over loopback (1 GiB guest dirtying 64 MB/s unless told otherwise).
    #[command(after_help = cli::help::DEMO_EXAMPLES)]
    Demo(DemoArgs),
    /// List this host's interfaces as multichannel sees them: address,
    /// prefix, link speed, RDMA device, and whether they can carry a migration.
    #[command(after_help = cli::help::NICS_EXAMPLES)]
    Nics(NicsArgs),
    /// Summarise a `ferry send --json` record, and draw it as an SVG.
    #[command(after_help = cli::help::REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Write a new pre-shared key for --auth-key-file: 32 random bytes,
    /// base64, to a new file of mode 0600 (never overwrites a file).
    #[command(after_help = cli::help::GEN_KEY_EXAMPLES)]
    GenKey(GenKeyArgs),
    /// Write a test PKI for --tls-dir: DIR/ca.pem and DIR/ca-key.pem (a new
    /// CA, unless --ca), DIR/cert.pem and DIR/key.pem (a host certificate
    /// signed by it, for client and server use). Never overwrites a file.
    #[command(after_help = cli::help::GEN_CERTS_EXAMPLES)]
    GenCerts(GenCertsArgs),
}

fn main() {
    let cli = Cli::parse();
    cli::logging::init(&cli.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let quiet = cli.log.quiet;
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Listen(a) => cli::listen::listen(a).await,
            Cmd::Send(a) => cli::send::send(a, quiet).await,
            Cmd::Demo(a) => cli::send::demo(a, quiet).await,
            Cmd::Nics(a) => cli::tools::list_nics(&a),
            Cmd::Report(a) => cli::tools::report(&a),
            Cmd::GenCerts(a) => cli::tools::gen_certs(&a),
            Cmd::GenKey(a) => cli::tools::gen_key(&a),
        }
    });
    if let Err(e) = r {
        if !cli::reported() {
            tracing::error!("{e:#}");
        }
        std::process::exit(cli::exit_status(&e));
    }
}
