//! `ferry`: live-migrate guest memory.
//!
//! * `ferry listen`: destination daemon.
//! * `ferry send`: source, with a built-in synthetic guest.
//! * `ferry demo`: both ends in one process over loopback.
//! * `ferry nics`: this host's interfaces as multichannel sees them.
//! * `ferry gen-certs`: a test CA and host certificates for `--tls-dir`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_migration::dest::{Destination, GuestSupport, ListenOptions, ResumeHook};
use ferry_migration::dirty::BitmapDirtyLog;
use ferry_migration::engine::{
    ConvergeReason, PauseParts, Phase, Progress, Source, SourceOptions, Summary, Verify,
};
use ferry_migration::guest::{
    verify_pages, SyntheticConfig, SyntheticGuest, SyntheticState, SYNTHETIC_FORMAT,
};
use ferry_migration::memory::{default_layout, source_memory};
use ferry_migration::nics::{self, MultichannelOptions};
use ferry_migration::report::{self, Record, RecordIn, Sampler};
use ferry_transport::auth::AuthKey;
use ferry_transport::compress::{CompressConfig, CompressionSpec};
use ferry_transport::multichannel::{ChannelCount, Cidr};
use ferry_transport::proto::{PerformanceOption, DEFAULT_PORT};
use ferry_transport::tls::TlsConfig;
use ferry_transport::ChannelState;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

mod units;

/// Ferry: live-migration memory transport.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Destination daemon: accept incoming migrations.
    Listen(ListenArgs),
    /// Source: migrate a synthetic guest to a destination.
    Send(SendArgs),
    /// Both ends in one process over loopback (1 GiB guest dirtying 64 MB/s unless told otherwise).
    Demo(DemoArgs),
    /// List this host's interfaces as multichannel sees them: address,
    /// prefix, link speed, RDMA device, and whether they can carry a migration.
    Nics(NicsArgs),
    /// Summarise a `ferry send --json` record, and draw it as an SVG.
    Report(ReportArgs),
    /// Write a test PKI for --tls-dir: DIR/ca.pem and DIR/ca-key.pem (a new
    /// CA, unless --ca), DIR/cert.pem and DIR/key.pem (a host certificate
    /// signed by it, for client and server use). Never overwrites a file.
    GenCerts(GenCertsArgs),
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// The record `ferry send --json FILE` wrote.
    file: PathBuf,
    /// Draw remaining dirty bytes per round and throughput per channel over
    /// time into this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    svg: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct GenCertsArgs {
    /// Directory to write into (created if missing).
    dir: PathBuf,
    /// Sign the host certificate with the CA of this directory (its ca.pem
    /// and ca-key.pem) instead of creating a new CA: one CA, many hosts.
    #[arg(long, value_name = "CA_DIR")]
    ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct NicsArgs {
    /// Also show what `ferry listen --migration-network` would advertise.
    #[arg(long = "migration-network", value_name = "CIDR")]
    migration_network: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OptionArg {
    /// Plain TCP/IP.
    Tcp,
    /// Pages compressed on worker threads (codec from --compression), raw
    /// whenever the link would otherwise wait for a core.
    Compression,
    /// RDMA WRITE from registered guest memory straight into the
    /// destination's, over every RDMA NIC pair on a shared subnet (NOT
    /// encrypted, so refused with --encrypt; needs RLIMIT_MEMLOCK above the
    /// guest size).
    Rdma,
    /// rdma when both hosts have an RDMA NIC on a shared subnet (and no
    /// --encrypt), else compression; says which it chose.
    Auto,
}

#[derive(Debug, Args)]
struct ListenArgs {
    /// Address and port to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    listen: SocketAddr,
    /// File holding the pre-shared key (at least 16 bytes).
    #[arg(long)]
    auth_key_file: PathBuf,
    /// Largest guest memory accepted, e.g. 64GiB.
    #[arg(long, default_value = "64GiB", value_parser = units::parse_size)]
    memory_limit: u64,
    /// Simultaneous incoming migrations.
    #[arg(long, default_value_t = 2)]
    max_concurrent: usize,
    /// Authenticated migrations that may wait for a free slot (beyond it:
    /// refused as busy, naming how many run and wait).
    #[arg(long, default_value_t = 4)]
    queue: usize,
    /// Longest a queued migration waits for a slot before it is refused.
    #[arg(long, default_value = "20s", value_parser = units::parse_duration)]
    queue_timeout: Duration,
    /// How long a source may stay silent (no message, no page) before its
    /// migration is aborted and its memory freed (also `--timeout`).
    #[arg(long = "peer-timeout", alias = "timeout", default_value = "30s", value_parser = units::parse_duration)]
    peer_timeout: Duration,
    /// Exit after the first migration attempt (status 0 only if it committed).
    #[arg(long)]
    once: bool,
    /// Network that migrations may use (repeatable; default: all). Only
    /// interfaces inside are advertised to sources, data channels arriving
    /// on another local address are refused, and a connection to an address
    /// inside from a peer outside is closed before anything is read from it
    /// (--listen on a migration-network address to admit only its peers).
    #[arg(long = "migration-network", value_name = "CIDR")]
    migration_network: Vec<Cidr>,
    /// Serve Prometheus metrics (text format 0.0.4) at http://ADDR/metrics:
    /// migrations started, committed, aborted by reason, bytes received per
    /// data channel, memory held, last downtime.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Refuse sources that do not encrypt (Reject naming the cause), and
    /// the RDMA option, whose data channels are not encrypted. Without it,
    /// a source that asks for encryption still gets it.
    #[arg(long)]
    encrypt: bool,
    /// TLS identity: DIR/ca.pem (the CA sources' certificates must chain
    /// to), DIR/cert.pem and DIR/key.pem (this host's certificate and key).
    /// Without it, the identity is derived from --auth-key-file.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct GuestArgs {
    /// Guest memory size, e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = units::parse_size)]
    memory: u64,
    /// Bytes per second the guest dirties, e.g. 64MB/s (0 for an idle guest).
    #[arg(long, default_value = "64MB/s", value_parser = units::parse_rate)]
    dirty_rate: u64,
    /// Fill guest memory from this file (the rest stays zero).
    #[arg(long)]
    guest_image: Option<PathBuf>,
    /// Fraction of pattern pages left zero at start (ignored with --guest-image).
    #[arg(long, default_value_t = 0.25)]
    zero_fraction: f64,
}

#[derive(Debug, Args)]
struct EngineArgs {
    /// Longest pause the engine aims for.
    #[arg(long, default_value = "300ms", value_parser = units::parse_duration)]
    downtime_limit: Duration,
    /// Pre-copy rounds before giving up on convergence: the migration is
    /// cancelled (exit status 3, guest running here) unless --force-switchover.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// At --max-rounds, switch over anyway with the longer pause.
    #[arg(long)]
    force_switchover: bool,
    /// When rounds stop shrinking, throttle the guest (20%, then +10% per
    /// round, up to 99%) so it dirties memory more slowly.
    #[arg(long)]
    auto_converge: bool,
    /// Cancel the migration (exit status 3, guest running here) when
    /// pre-copy has not switched over after this long, e.g. 10m.
    #[arg(long, value_parser = units::parse_duration)]
    timeout: Option<Duration>,
    /// Cap on the wire bytes of all data channels together, e.g. 115MB/s
    /// (tcp and compression options; RDMA is not paced).
    #[arg(long, value_parser = units::parse_rate)]
    bandwidth_limit: Option<u64>,
    /// Payload bytes per chunk.
    #[arg(long, default_value = "4MiB", value_parser = units::parse_size)]
    chunk_size: u64,
    /// How long to wait for the peer (any message or acknowledgement)
    /// before giving up.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    peer_timeout: Duration,
    /// Transport: compression (the default, as on Hyper-V) or plain tcp.
    #[arg(long, value_enum, default_value_t = OptionArg::Compression)]
    performance_option: OptionArg,
    /// Codec of the compression option: lz4, zstd or zstd:LEVEL (1-19).
    #[arg(long, default_value = "zstd:1")]
    compression: CompressionSpec,
    /// Compression worker threads (default: one per core; they run niced).
    #[arg(long)]
    compression_threads: Option<usize>,
    /// Data channels: auto (one per pair of interfaces on a shared subnet,
    /// one in all when none pairs) or a count (spread over the pairs).
    #[arg(long, default_value = "auto")]
    channels: ChannelCount,
    /// Use only this local address for data channels (repeatable).
    #[arg(long, value_name = "ADDR")]
    nic: Vec<IpAddr>,
    /// A data channel that makes no progress for this long fails over to
    /// the others.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    channel_timeout: Duration,
    /// Encrypt the control connection and every TCP data channel (tcp and
    /// compression options) with TLS 1.3, each channel its own session.
    /// RDMA data channels are NOT encrypted: --encrypt refuses
    /// --performance-option rdma, and auto then picks compression.
    #[arg(long)]
    encrypt: bool,
    /// TLS identity for --encrypt: DIR/ca.pem (the CA the destination's
    /// certificate must chain to), DIR/cert.pem and DIR/key.pem (this
    /// host's). Without it, the identity is derived from the pre-shared key.
    #[arg(long, value_name = "DIR", requires = "encrypt")]
    tls_dir: Option<PathBuf>,
    /// Write a JSON record here: the summary, per-round and per-channel
    /// figures, and a time series sampled every 100 ms (`ferry report`
    /// draws it).
    #[arg(long)]
    json: Option<PathBuf>,
    /// How the switchover verifies memory. `evidence` (the default): both
    /// sides build keyed evidence of every page as it moves and prove it to
    /// each other in the pause in constant time; after the pause the source
    /// audits its frozen memory against it (catching dirty-tracking misses).
    /// `full`: also hash the whole guest memory on both sides inside the
    /// pause, as before; it costs about 0.2 s per GiB of pause on a 2-core
    /// host, which the pause budget counts (raise --downtime-limit).
    #[arg(long, value_enum, default_value_t = VerifyArg::Evidence)]
    verify: VerifyArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VerifyArg {
    /// Page evidence proved in the pause, audit after it.
    Evidence,
    /// Also a whole-memory hash on both sides inside the pause.
    Full,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Destination HOST[:PORT] (port 6600 when omitted).
    #[arg(long)]
    to: String,
    /// File holding the pre-shared key.
    #[arg(long)]
    auth_key_file: PathBuf,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
struct DemoArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs and CI captures stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Listen(a) => listen(a).await,
            Cmd::Send(a) => send(a).await,
            Cmd::Demo(a) => demo(a).await,
            Cmd::Nics(a) => list_nics(&a),
            Cmd::Report(a) => report(&a),
            Cmd::GenCerts(a) => gen_certs(&a),
        }
    });
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        // 3: cancelled because the guest did not converge (--max-rounds,
        // --timeout); the guest keeps running on the source.
        let not_converged = e.chain().any(|c| {
            c.downcast_ref::<ferry_migration::MigrationError>()
                .is_some_and(ferry_migration::MigrationError::is_not_converged)
        });
        std::process::exit(if not_converged { 3 } else { 1 });
    }
}

/// The TLS settings `--tls-dir DIR` names, else the key's.
fn tls_config(dir: Option<&std::path::Path>, key: &AuthKey) -> anyhow::Result<Arc<TlsConfig>> {
    Ok(Arc::new(match dir {
        Some(d) => TlsConfig::from_dir(d)?,
        None => TlsConfig::from_psk(key)?,
    }))
}

fn gen_certs(a: &GenCertsArgs) -> anyhow::Result<()> {
    for f in ferry_transport::tls::generate(&a.dir, a.ca.as_deref())? {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn source_options(e: &EngineArgs) -> anyhow::Result<SourceOptions> {
    if e.downtime_limit.is_zero() {
        bail!("--downtime-limit must be above zero");
    }
    if e.encrypt && e.performance_option == OptionArg::Rdma {
        bail!("{}", ferry_migration::engine::RDMA_NOT_ENCRYPTED);
    }
    let chunk_bytes = u32::try_from(e.chunk_size)
        .ok()
        .filter(|c| *c >= 4096 && *c <= ferry_transport::wire::MAX_CHUNK_PAYLOAD);
    let Some(chunk_bytes) = chunk_bytes else {
        bail!(
            "--chunk-size must be between 4KiB and {} bytes",
            ferry_transport::wire::MAX_CHUNK_PAYLOAD
        )
    };
    Ok(SourceOptions {
        downtime_limit: e.downtime_limit,
        max_rounds: e.max_rounds.max(1),
        chunk_bytes,
        timeout: e.peer_timeout,
        total_timeout: match e.timeout {
            Some(t) if t.is_zero() => bail!("--timeout must be above zero"),
            t => t,
        },
        bandwidth_limit: match e.bandwidth_limit {
            Some(0) => bail!("--bandwidth-limit must be above zero"),
            b => b,
        },
        auto_converge: e.auto_converge,
        force_switchover: e.force_switchover,
        option: match e.performance_option {
            OptionArg::Tcp => PerformanceOption::Tcp,
            OptionArg::Compression | OptionArg::Auto => PerformanceOption::Compression {
                codec: e.compression.codec.id(),
                level: e.compression.level,
            },
            OptionArg::Rdma => PerformanceOption::Rdma,
        },
        compression_workers: match e.compression_threads {
            Some(0) => bail!("--compression-threads must be at least 1"),
            Some(n) => n,
            None => CompressConfig::default_workers(),
        },
        multichannel: MultichannelOptions {
            channels: e.channels,
            nics: e.nic.clone(),
            channel_timeout: e.channel_timeout,
        },
        tls: None,
        verify: match e.verify {
            VerifyArg::Evidence => Verify::Evidence,
            VerifyArg::Full => Verify::Full,
        },
    })
}

fn start_guest(g: &GuestArgs) -> anyhow::Result<SyntheticGuest> {
    let layout = default_layout(g.memory).context("--memory")?;
    let mem = Arc::new(source_memory(&layout)?);
    let cfg = SyntheticConfig {
        dirty_rate: g.dirty_rate,
        zero_fraction: g.zero_fraction,
        image: g.guest_image.clone(),
        seed: 1,
    };
    Ok(SyntheticGuest::start(mem, cfg)?)
}

/// The CLI destination's side of a VMM, for the synthetic guest: it
/// restores its device state (parsing it is what can fail, before
/// `Committed`), then, resumed, checks every page of the guest on its own.
fn resume_hook() -> ResumeHook {
    ResumeHook {
        supports: GuestSupport {
            max_vcpus: 1,
            cpu_vendor: Some(ferry_migration::guest::cpu_vendor()),
            device_state_formats: vec![SYNTHETIC_FORMAT.into()],
        },
        restore: Arc::new(|_mem, state| {
            let st: SyntheticState = serde_json::from_slice(state)
                .map_err(|e| format!("device state is not {SYNTHETIC_FORMAT}: {e}"))?;
            Ok(format!("restored after {} guest writes", st.writes))
        }),
        resume: Arc::new(|mem| {
            let c = verify_pages(mem);
            if c.corrupt > 0 {
                return Err(format!(
                    "{} corrupt pages, first at {:#x}",
                    c.corrupt,
                    c.first_corrupt.unwrap_or(0)
                ));
            }
            Ok(format!(
                "guest resumed: {} pattern pages verified, {} zero, {} image pages (evidence-checked)",
                c.pattern, c.zero, c.other
            ))
        }),
    }
}

fn with_port(to: &str) -> String {
    let has_port = to
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')));
    if has_port {
        to.to_string()
    } else {
        format!("{to}:{DEFAULT_PORT}")
    }
}

async fn listen(a: ListenArgs) -> anyhow::Result<()> {
    let key = AuthKey::from_file(&a.auth_key_file)?;
    let tls = tls_config(a.tls_dir.as_deref(), &key)?;
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let opts = ListenOptions {
        key,
        memory_limit: a.memory_limit,
        timeout: a.peer_timeout,
        max_concurrent: a.max_concurrent,
        queue: a.queue,
        queue_timeout: a.queue_timeout,
        migration_networks: a.migration_network.clone(),
        tls: Some(tls.clone()),
        require_encryption: a.encrypt,
    };
    let dest = Destination::new(opts, resume_hook());
    if let Some(addr) = a.metrics {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics: cannot listen on {addr}"))?;
        eprintln!("ferry: metrics on http://{}/metrics", l.local_addr()?);
        let metrics = dest.metrics();
        tokio::spawn(async move {
            if let Err(e) = ferry_migration::metrics::serve(l, metrics).await {
                eprintln!("ferry: metrics server stopped: {e}");
            }
        });
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    eprintln!(
        "ferry: listening on {} ({}; TLS identity: {})",
        listener.local_addr()?,
        if a.encrypt {
            "encryption required"
        } else {
            "encryption optional"
        },
        tls.mode()
    );
    let server = tokio::spawn(dest.serve(listener, tx));
    while let Some(o) = rx.recv().await {
        match &o.result {
            Ok(s) => println!(
                "migration {} from {} committed: {} bytes, digest {} verified; {}; {}; {}",
                s.migration_id,
                o.peer,
                s.memory_bytes,
                s.digest,
                s.restore_report,
                s.resume_report,
                dest_audit_line(s.audit.as_ref())
            ),
            Err(e) => println!("migration from {} failed: {e}", o.peer),
        }
        if a.once {
            server.abort();
            if let Ok(s) = &o.result {
                if s.audit
                    .as_ref()
                    .is_some_and(|a| a.result == ferry_transport::proto::AuditResult::Failed)
                {
                    eprintln!("error: the migration committed but the source's audit failed");
                    std::process::exit(4);
                }
            }
            return o.result.map(|_| ()).map_err(Into::into);
        }
    }
    server.await??;
    Ok(())
}

/// How the destination reports the source's audit.
fn dest_audit_line(a: Option<&ferry_transport::proto::AuditReport>) -> String {
    use ferry_transport::proto::AuditResult;
    match a {
        Some(a) if a.result == AuditResult::Passed => {
            format!("audit passed ({} pages)", a.pages)
        }
        Some(a) => format!(
            "AUDIT FAILED: {} pages differ from the source's frozen memory (first at {:#x}): the source's dirty log missed guest writes",
            a.mismatched_pages,
            a.first_mismatch.unwrap_or(0)
        ),
        None => "audit report not received".into(),
    }
}

async fn run_source(
    to: String,
    key: &AuthKey,
    guest: &SyntheticGuest,
    e: &EngineArgs,
) -> anyhow::Result<Summary> {
    let mut opts = source_options(e)?;
    if e.encrypt {
        opts.tls = Some(tls_config(e.tls_dir.as_deref(), key)?);
    }
    // auto: try rdma when this host has an RDMA NIC; if the destination
    // refuses the option (no RDMA NIC, no shared subnet), fall back to
    // compression. Nothing has moved when it refuses.
    let fallback = opts.option;
    if e.performance_option == OptionArg::Auto && opts.bandwidth_limit.is_some() {
        eprintln!("ferry: auto: chose {fallback} (--bandwidth-limit: RDMA is not paced)");
    } else if e.performance_option == OptionArg::Auto {
        let usable = if e.encrypt {
            Err("--encrypt: RDMA data channels are not encrypted".to_string())
        } else {
            auto_rdma(&opts.multichannel)
        };
        match usable {
            Ok(()) => opts.option = PerformanceOption::Rdma,
            Err(why) => eprintln!("ferry: auto: chose {fallback} ({why})"),
        }
    }
    if opts.option == PerformanceOption::Rdma && e.performance_option == OptionArg::Auto {
        let tried = run_source_with(to.clone(), key, guest, e, opts.clone()).await;
        match tried {
            Err(err) if is_option_rejected(&err) => {
                eprintln!("ferry: auto: the destination refused rdma ({err:#}); chose {fallback}");
                opts.option = fallback;
            }
            Ok(s) => {
                eprintln!("ferry: auto: chose rdma");
                return Ok(s);
            }
            Err(err) => return Err(err),
        }
    }
    run_source_with(to, key, guest, e, opts).await
}

/// Whether this host could use RDMA (`--performance-option auto`).
fn auto_rdma(mc: &MultichannelOptions) -> Result<(), String> {
    #[cfg(feature = "rdma")]
    {
        ferry_migration::rdma::source_endpoints(mc)
            .map(|_| ())
            .map_err(|e| format!("no usable RDMA here: {e}"))
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = mc;
        Err("this ferry was built without the rdma feature".into())
    }
}

fn is_option_rejected(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ferry_transport::TransportError>(),
            Some(ferry_transport::TransportError::Rejected {
                reason: ferry_transport::proto::RejectReason::Option,
                ..
            })
        ) || matches!(
            c.downcast_ref::<ferry_migration::MigrationError>(),
            Some(ferry_migration::MigrationError::Transport(
                ferry_transport::TransportError::Rejected {
                    reason: ferry_transport::proto::RejectReason::Option,
                    ..
                }
            ))
        )
    })
}

async fn run_source_with(
    to: String,
    key: &AuthKey,
    guest: &SyntheticGuest,
    e: &EngineArgs,
    opts: SourceOptions,
) -> anyhow::Result<Summary> {
    let dirty = BitmapDirtyLog::new(guest.memory().clone());
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(progress.clone());
    let sampler = Sampler::start(progress.clone(), Duration::from_millis(100));
    let src = Source {
        to,
        key,
        guest,
        mem: guest.memory().clone(),
        dirty: &dirty,
        opts,
        progress,
    };
    let r = src.migrate().await;
    bar.abort();
    let samples = sampler.stop();
    let summary = r?;
    if let Some(path) = &e.json {
        let record = Record {
            schema: report::SCHEMA,
            summary: &summary,
            samples: &samples,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print_summary(&summary);
    Ok(summary)
}

fn progress_bar(p: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("template"),
        );
        let started = std::time::Instant::now();
        let mut last: (std::time::Instant, Vec<u64>) = (started, Vec::new());
        let mut rates: Vec<u64> = Vec::new();
        loop {
            let chans = p.channels();
            let dt = last.0.elapsed().as_secs_f64();
            if dt >= 0.5 {
                rates = chans
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let before = last.1.get(i).copied().unwrap_or(0);
                        (c.payload_bytes.saturating_sub(before) as f64 / dt) as u64
                    })
                    .collect();
                last = (
                    std::time::Instant::now(),
                    chans.iter().map(|c| c.payload_bytes).collect(),
                );
            }
            let per_channel: String = if chans.len() > 1 {
                chans
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match c.state {
                        ChannelState::Failed => format!(" ch{i} failed"),
                        _ => format!(
                            " ch{i} {}/s",
                            units::human(rates.get(i).copied().unwrap_or(0))
                        ),
                    })
                    .collect::<String>()
            } else {
                String::new()
            };
            let sent = p.sent_bytes.load(std::sync::atomic::Ordering::Relaxed);
            let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let phase = match p.phase() {
                Phase::Connecting => "connecting".to_string(),
                Phase::Precopy => format!(
                    "round {}",
                    p.round.load(std::sync::atomic::Ordering::Relaxed)
                ),
                Phase::Switchover => "switchover (guest paused)".to_string(),
                Phase::Done => "done".to_string(),
            };
            bar.set_message(format!(
                "{phase} | remaining dirty {} | sent {} | {}/s{}{per_channel}",
                units::human(p.remaining_bytes.load(std::sync::atomic::Ordering::Relaxed)),
                units::human(sent),
                units::human(rate as u64),
                if per_channel.is_empty() { "" } else { " |" },
            ));
            bar.tick();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn print_summary(s: &Summary) {
    println!(
        "migration committed: {} guest over {} in {:.2} s",
        units::human(s.memory_bytes),
        s.option,
        s.total_ms / 1e3
    );
    println!(
        "  rounds: {} pre-copy + final copy (stopped: {:?}); downtime {:.1} ms (predicted {:.1} ms)",
        s.rounds.len() - 1,
        s.converge_reason,
        s.downtime_ms,
        s.predicted_downtime_ms
    );
    let parts = |p: &PauseParts| {
        format!(
            "final copy {:.1}, device state {:.1}, verification {:.1}, commit round trip {:.1}",
            p.final_copy_ms, p.device_state_ms, p.verification_ms, p.commit_round_trip_ms
        )
    };
    println!("  pause (ms): {}", parts(&s.pause_actual));
    println!("  predicted:  {}", parts(&s.pause_predicted));
    if matches!(
        s.converge_reason,
        ConvergeReason::RoundCap | ConvergeReason::CannotFit
    ) {
        println!(
            "  --force-switchover: switched over without a pause that fits the limit, predicted pause {:.0} ms",
            s.predicted_downtime_ms
        );
    }
    if s.rounds.iter().any(|r| r.throttle_percent > 0) {
        println!(
            "  auto-converge: guest throttled {}% at switchover; per round (final copy last): {}",
            s.throttle_percent,
            s.rounds
                .iter()
                .map(|r| format!("{}%", r.throttle_percent))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(cap) = s.bandwidth_limit {
        println!(
            "  bandwidth limit {}/s: {}/s on the wire",
            units::human(cap),
            units::human(s.wire_bytes_per_sec as u64)
        );
    }
    println!(
        "  throughput {}/s ({:.2} Gbit/s); page bytes {}; bytes on the wire {}; CRC resends {}",
        units::human(s.throughput_bytes_per_sec as u64),
        s.throughput_bytes_per_sec * 8.0 / 1e9,
        units::human(s.payload_bytes),
        units::human(s.bytes_on_wire),
        s.crc_resends
    );
    if let PerformanceOption::Compression { .. } = s.option {
        let sum =
            |f: fn(&ferry_transport::ChannelStats) -> u64| s.channels.iter().map(f).sum::<u64>();
        println!(
            "  compression: {:.2}x page bytes per wire byte; chunks compressed {}, raw (incompressible) {}, raw (link would idle) {}",
            s.compression_ratio,
            sum(|c| c.compressed_chunks),
            sum(|c| c.raw_incompressible_chunks),
            sum(|c| c.raw_link_idle_chunks),
        );
    }
    if s.channels.len() > 1 || s.channels.iter().any(|c| c.state == ChannelState::Failed) {
        println!("  data channels: {}", s.channels.len());
        for c in &s.channels {
            println!(
                "    ch{} {} -> {}{}: {:?}, {} page bytes at {}/s, {} chunks{}{}",
                c.channel,
                c.local.as_deref().unwrap_or("?"),
                c.remote.as_deref().unwrap_or("?"),
                c.device
                    .as_deref()
                    .map(|d| format!(" (dev {d})"))
                    .unwrap_or_default(),
                c.state,
                units::human(c.payload_bytes),
                units::human(c.rate_bytes_per_sec),
                c.chunks,
                if c.requeued_chunks > 0 {
                    format!(", {} chunks requeued", c.requeued_chunks)
                } else {
                    String::new()
                },
                c.error
                    .as_deref()
                    .map(|e| format!(", failed: {e}"))
                    .unwrap_or_default(),
            );
        }
    }
    if let Some(enc) = &s.encryption {
        println!("  encryption: {enc}, on the control connection and every data channel");
    }
    println!(
        "  digest {} verified on both sides ({})",
        s.digest,
        match s.verify {
            Verify::Evidence => "page evidence",
            Verify::Full => "page evidence and whole memory",
        }
    );
    if s.audit.failed() {
        println!(
            "  AUDIT FAILED: {} pages of the frozen source memory differ from what was migrated (first at {:#x}): the dirty log missed guest writes; the destination runs with stale pages",
            s.audit.mismatched_pages,
            s.audit.first_mismatch.unwrap_or(0)
        );
    } else {
        println!(
            "  audit passed: {} pages of the frozen source memory equal what was migrated ({:.0} ms after the pause)",
            s.audit.pages, s.audit.duration_ms
        );
    }
}

async fn send(a: SendArgs) -> anyhow::Result<()> {
    let key = AuthKey::from_file(&a.auth_key_file)?;
    let guest = start_guest(&a.guest)?;
    let r = run_source(with_port(&a.to), &key, &guest, &a.engine).await;
    audit_exit(&r);
    if r.is_err() {
        if guest.is_running() {
            eprintln!(
                "ferry: migration failed; the guest keeps running on this host (running: true)"
            );
        } else {
            // Commit was sent but not confirmed: resuming could make two
            // running copies.
            eprintln!(
                "ferry: migration failed; the guest is left paused on this host (running: false)"
            );
        }
    }
    r.map(|_| ())
}

/// A committed migration whose audit failed exits with status 4 (after
/// its summary and record were written).
fn audit_exit(r: &anyhow::Result<Summary>) {
    if let Ok(s) = r {
        if s.audit.failed() {
            eprintln!("error: the migration committed but its audit failed: the destination runs with pages the source's dirty log never reported");
            std::process::exit(4);
        }
    }
}

fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let r = RecordIn::parse(&bytes).with_context(|| format!("{}", a.file.display()))?;
    print!("{}", r.text_summary());
    if let Some(out) = &a.svg {
        std::fs::write(out, r.svg()).with_context(|| format!("cannot write {}", out.display()))?;
        println!("drawn: {}", out.display());
    }
    Ok(())
}

fn list_nics(a: &NicsArgs) -> anyhow::Result<()> {
    let all = nics::discover()?;
    println!(
        "{:<16} {:<40} {:<6} {:>12} {:<10} migration",
        "interface", "address", "state", "speed", "rdma"
    );
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
        println!(
            "{:<16} {:<40} {:<6} {:>12} {:<10} {usable}",
            n.name,
            format!("{}/{}", n.addr, n.prefix),
            state,
            n.speed_mbps
                .map(|m| format!("{m} Mbit/s"))
                .unwrap_or_else(|| "-".into()),
            n.rdma.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let key = AuthKey::random();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a loopback port")?;
    let addr = listener.local_addr()?;
    let opts = ListenOptions {
        key: key.clone(),
        memory_limit: u64::MAX,
        timeout: a.engine.peer_timeout,
        max_concurrent: 2,
        queue: 0,
        queue_timeout: Duration::ZERO,
        migration_networks: Vec::new(),
        tls: Some(tls_config(a.engine.tls_dir.as_deref(), &key)?),
        require_encryption: a.engine.encrypt,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(Destination::new(opts, resume_hook()).serve(listener, tx));
    eprintln!(
        "ferry demo: {} guest dirtying {}/s, migrating over loopback {addr}",
        units::human(a.guest.memory),
        units::human(a.guest.dirty_rate)
    );
    let guest = start_guest(&a.guest)?;
    let r = run_source(addr.to_string(), &key, &guest, &a.engine).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    server.abort();
    audit_exit(&r);
    r?;
    match outcome {
        Ok(Some(o)) => {
            let d = o.result?;
            println!(
                "  destination: digest {} verified; {}; {}",
                d.digest,
                d.resume_report,
                dest_audit_line(d.audit.as_ref())
            );
            Ok(())
        }
        _ => bail!("the destination did not report its outcome"),
    }
}
