//! The command line: every subcommand's flags, and the source's options from them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};
use ferry_migration::engine::{SourceOptions, Verify};
use ferry_migration::nics::MultichannelOptions;
use ferry_transport::compress::{CompressConfig, CompressionSpec};
use ferry_transport::multichannel::{ChannelCount, Cidr};
use ferry_transport::proto::PerformanceOption;

use super::units;

/// Help sections, in the order `--help` lists them.
pub const CONNECTION: &str = "Connection";
pub const ADMISSION: &str = "Admission";
pub const GUEST: &str = "Guest";
pub const TRANSPORT: &str = "Transport";
pub const CONVERGENCE: &str = "Convergence";
pub const SECURITY: &str = "Security";
pub const OUTPUT: &str = "Output";

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The record `ferry send --json FILE` wrote.
    pub file: PathBuf,
    /// Draw remaining dirty bytes per round and throughput per channel over
    /// time into this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenKeyArgs {
    /// The key file to create (never overwritten).
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct GenCertsArgs {
    /// Directory to write into (created if missing).
    pub dir: PathBuf,
    /// Sign the host certificate with the CA of this directory (its ca.pem
    /// and ca-key.pem) instead of creating a new CA: one CA, many hosts.
    #[arg(long, value_name = "CA_DIR")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct NicsArgs {
    /// Also show what `ferry listen --migration-network` would advertise.
    #[arg(long = "migration-network", value_name = "CIDR")]
    pub migration_network: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptionArg {
    /// Plain TCP/IP.
    Tcp,
    /// Pages compressed on worker threads (codec from --compression), raw
    /// whenever the link would otherwise wait for a core.
    Compression,
    /// RDMA WRITE from registered guest memory straight into the
    /// destination's, over every RDMA NIC pair on a shared subnet (NOT
    /// encrypted: needs --plaintext on both ends; needs RLIMIT_MEMLOCK above
    /// the guest size).
    Rdma,
    /// rdma when both hosts have an RDMA NIC on a shared subnet and
    /// --plaintext is given, else compression; says which it chose.
    Auto,
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    /// Address (or host name) and port to listen on (port 6600 when
    /// omitted). A single address takes data channels on that address
    /// only: listen on 0.0.0.0 (with --migration-network) to use every NIC.
    #[arg(help_heading = CONNECTION, long, default_value = "0.0.0.0:6600", value_name = "HOST[:PORT]")]
    pub listen: String,
    /// Network that migrations may use (repeatable; default: all). Only
    /// interfaces inside are advertised to sources, data channels arriving
    /// on another local address are refused, and a connection to an address
    /// inside from a peer outside is closed before anything is read from it
    /// (--listen on a migration-network address to admit only its peers).
    #[arg(help_heading = CONNECTION, long = "migration-network", value_name = "CIDR")]
    pub migration_network: Vec<Cidr>,
    /// How long a source may stay silent (no message, no page) before its
    /// migration is aborted and its memory freed (also `--timeout`).
    #[arg(help_heading = CONNECTION, long = "peer-timeout", alias = "timeout", default_value = "30s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub peer_timeout: Duration,
    /// Exit after the first migration attempt (status 0 only if it committed).
    #[arg(help_heading = CONNECTION, long)]
    pub once: bool,
    /// Largest guest memory accepted, e.g. 64GiB.
    #[arg(help_heading = ADMISSION, long, default_value = "64GiB", value_parser = units::parse_size, value_name = "SIZE")]
    pub memory_limit: u64,
    /// Simultaneous incoming migrations.
    #[arg(help_heading = ADMISSION, long, default_value_t = 2)]
    pub max_concurrent: usize,
    /// Authenticated migrations that may wait for a free slot (beyond it:
    /// refused as busy, naming how many run and wait).
    #[arg(help_heading = ADMISSION, long, default_value_t = 4)]
    pub queue: usize,
    /// Longest a queued migration waits for a slot before it is refused.
    #[arg(help_heading = ADMISSION, long, default_value = "20s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub queue_timeout: Duration,
    /// One deadline for everything before a connection has authenticated
    /// (TLS handshake, hello, proof); past it the connection is closed.
    #[arg(help_heading = ADMISSION, long, default_value = "5s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,
    /// Most connections authenticating at once (never above a quarter of
    /// the descriptor limit); more are closed as soon as they are accepted,
    /// so strangers cannot use up the daemon's descriptors.
    #[arg(help_heading = ADMISSION, long, default_value_t = ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED, value_name = "N")]
    pub max_unauthenticated: usize,
    /// Most of them from one source address.
    #[arg(help_heading = ADMISSION, long, default_value_t = ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE, value_name = "N")]
    pub max_unauthenticated_per_source: usize,
    /// File holding the pre-shared key, as `ferry gen-key FILE` writes it
    /// (32 random bytes in base64, mode 0600; a shorter key, or a file that
    /// group or others may read, is refused).
    #[arg(help_heading = SECURITY, long, value_name = "FILE")]
    pub auth_key_file: PathBuf,
    /// Also accept sources that do not encrypt, and the RDMA option (whose
    /// data channels cannot be encrypted). Only for a trusted, isolated
    /// migration network: guest memory and device state cross it readable.
    /// Without it (the default) every source must use TLS 1.3.
    #[arg(help_heading = SECURITY, long)]
    pub plaintext: bool,
    /// Encryption is the default: still accepted, changes nothing.
    #[arg(long, hide = true, conflicts_with = "plaintext")]
    pub encrypt: bool,
    /// TLS identity: DIR/ca.pem (the CA sources' certificates must chain
    /// to), DIR/cert.pem and DIR/key.pem (this host's certificate and key).
    /// Without it, the identity is derived from --auth-key-file.
    #[arg(help_heading = SECURITY, long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (text format 0.0.4) at http://ADDR/metrics:
    /// migrations started, committed, aborted by reason, bytes received per
    /// data channel, memory held, last downtime.
    #[arg(help_heading = OUTPUT, long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Where `ferry relay` sources may have their hypervisor's connections
    /// delivered (repeatable; default 127.0.0.0/8 and ::1/128, this host's
    /// own hypervisor only). A --deliver-to outside is refused before any
    /// connection is made.
    #[arg(help_heading = ADMISSION, long = "relay-allow", value_name = "CIDR")]
    pub relay_allow: Vec<Cidr>,
    /// Back the guest's memory, SIZE of it, at start, before any migration
    /// arrives, as a VMM that preallocates guest memory does (QEMU
    /// -mem-prealloc, Cloud Hypervisor prefault=on, hugetlbfs): the first
    /// migration of a SIZE guest lands in it. Populating it is the guest's
    /// work, reported at start and outside every migration's time and CPU
    /// figure. Without it (the default) memory is backed as pages land,
    /// and that is part of Ferry's CPU figure.
    #[arg(help_heading = GUEST, long, value_parser = units::parse_size, value_name = "SIZE")]
    pub prealloc_guest: Option<u64>,
    /// Back the guest's memory with 2 MiB pages from the kernel's hugetlb
    /// pool, as VMMs do for speed (QEMU -mem-path /dev/hugepages, Cloud
    /// Hypervisor hugepages=on): a landing page then costs no page fault of
    /// its own (one per 2 MiB) and pool pages stay backed between guests.
    /// The pool must hold every migrating guest's memory (reserve it with
    /// `sysctl vm.nr_hugepages=N`, N = GiB x 512): a migration it cannot
    /// hold is refused, saying so. Guest memory regions must be whole 2 MiB
    /// pages. Applies to --prealloc-guest too.
    #[arg(help_heading = GUEST, long)]
    pub hugepages: bool,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Where the hypervisor connects (QEMU: `migrate tcp:127.0.0.1:PORT`);
    /// loopback only. Port 0 picks one (printed when ready).
    #[arg(help_heading = CONNECTION, long, value_name = "127.0.0.1:PORT")]
    pub listen: SocketAddr,
    /// Destination `ferry listen` HOST[:PORT] (port 6600 when omitted).
    #[arg(help_heading = CONNECTION, long, value_name = "HOST[:PORT]")]
    pub to: String,
    /// Where the destination connects the streams, as the destination sees
    /// it (QEMU: its `-incoming tcp:HOST:PORT`); must be inside the
    /// destination's --relay-allow (loopback by default).
    #[arg(help_heading = CONNECTION, long, value_name = "HOST:PORT")]
    pub deliver_to: String,
    /// How long to wait for the peer before giving up: connecting, and any
    /// silence on the relay's control connection (it pings the destination
    /// at least every second).
    #[arg(help_heading = CONNECTION, long, default_value = "30s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub peer_timeout: Duration,
    /// Transport: compression (per chunk, only where it pays; the default)
    /// or tcp. (rdma does not carry streams; auto means compression.)
    #[arg(help_heading = TRANSPORT, long, value_enum, default_value_t = OptionArg::Compression)]
    pub performance_option: OptionArg,
    /// Codec of the compression option: lz4, zstd or zstd:LEVEL (1-19).
    #[arg(help_heading = TRANSPORT, long, default_value = "lz4")]
    pub compression: CompressionSpec,
    /// Data channels: auto (one per pair of interfaces on a shared subnet)
    /// or a count (spread over the pairs).
    #[arg(help_heading = TRANSPORT, long, default_value = "auto")]
    pub channels: ChannelCount,
    /// Use only this local address for data channels (repeatable).
    #[arg(help_heading = TRANSPORT, long, value_name = "ADDR")]
    pub nic: Vec<IpAddr>,
    /// A data channel with chunks unacknowledged for this long fails over.
    #[arg(help_heading = TRANSPORT, long, default_value = "10s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub channel_timeout: Duration,
    /// Cap on the wire bytes of all data channels together, e.g. 115MB/s.
    #[arg(help_heading = TRANSPORT, long, value_parser = units::parse_rate, value_name = "RATE")]
    pub bandwidth_limit: Option<u64>,
    /// Bytes each stream direction may have in flight beyond what the
    /// destination's hypervisor read (end-to-end back-pressure). The
    /// destination books two windows per open stream against its
    /// --memory-limit.
    #[arg(help_heading = TRANSPORT, long, default_value = "32MiB", value_parser = units::parse_size, value_name = "SIZE")]
    pub window: u64,
    /// Most hypervisor connections (QEMU: 1 + multifd channels).
    #[arg(help_heading = TRANSPORT, long, default_value_t = ferry_migration::relay::DEFAULT_MAX_STREAMS)]
    pub max_streams: u32,
    /// File holding the pre-shared key (the same as the destination's).
    #[arg(help_heading = SECURITY, long, value_name = "FILE")]
    pub auth_key_file: PathBuf,
    /// Do not encrypt the data channels and control connection (only on a
    /// trusted, isolated migration network; the destination must allow it).
    #[arg(help_heading = SECURITY, long)]
    pub plaintext: bool,
    /// TLS identity directory (as for send).
    #[arg(help_heading = SECURITY, long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Write a JSON record of the relay here (streams, channels, outcome).
    #[arg(help_heading = OUTPUT, long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write events as JSON lines (ready, outcome) to FILE, or `-` for stdout.
    #[arg(help_heading = OUTPUT, long, value_name = "FILE|-")]
    pub events: Option<String>,
}

#[derive(Debug, Args)]
pub struct GuestArgs {
    /// Guest memory size, e.g. 1GiB.
    #[arg(help_heading = GUEST, long, default_value = "1GiB", value_parser = units::parse_pages, value_name = "SIZE")]
    pub memory: units::Size,
    /// Bytes per second the guest dirties, e.g. 64MB/s (0 for an idle guest).
    #[arg(help_heading = GUEST, long, default_value = "64MB/s", value_parser = units::parse_rate, value_name = "RATE")]
    pub dirty_rate: u64,
    /// Fill guest memory from this file (the rest stays zero).
    #[arg(help_heading = GUEST, long, value_name = "FILE")]
    pub guest_image: Option<PathBuf>,
    /// Fraction of pattern pages left zero at start (ignored with --guest-image).
    #[arg(help_heading = GUEST, long, default_value_t = 0.25)]
    pub zero_fraction: f64,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// How long to wait for the peer (any message or acknowledgement)
    /// before giving up.
    #[arg(help_heading = CONNECTION, long, default_value = "30s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub peer_timeout: Duration,
    /// Transport: compression (the default, as on Hyper-V), tcp, rdma, or
    /// auto (rdma when both hosts can, else compression).
    #[arg(help_heading = TRANSPORT, long, value_enum, default_value_t = OptionArg::Compression)]
    pub performance_option: OptionArg,
    /// Codec of the compression option: lz4, zstd or zstd:LEVEL (1-19).
    #[arg(help_heading = TRANSPORT, long, default_value = "zstd:1")]
    pub compression: CompressionSpec,
    /// Compression worker threads (default: one per core; they run niced).
    #[arg(help_heading = TRANSPORT, long)]
    pub compression_threads: Option<usize>,
    /// Data channels: auto (one per pair of interfaces on a shared subnet,
    /// one in all when none pairs) or a count (spread over the pairs).
    #[arg(help_heading = TRANSPORT, long, default_value = "auto")]
    pub channels: ChannelCount,
    /// Use only this local address for data channels (repeatable).
    #[arg(help_heading = TRANSPORT, long, value_name = "ADDR")]
    pub nic: Vec<IpAddr>,
    /// A data channel that makes no progress for this long fails over to
    /// the others.
    #[arg(help_heading = TRANSPORT, long, default_value = "10s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub channel_timeout: Duration,
    /// Cap on the wire bytes of all data channels together, e.g. 115MB/s
    /// (tcp and compression options; RDMA is not paced).
    #[arg(help_heading = TRANSPORT, long, value_parser = units::parse_rate, value_name = "RATE")]
    pub bandwidth_limit: Option<u64>,
    /// Payload bytes per chunk.
    #[arg(help_heading = TRANSPORT, long, default_value = "4MiB", value_parser = units::parse_page_bytes, value_name = "SIZE")]
    pub chunk_size: u64,
    /// Longest pause the engine aims for: it switches over once the
    /// predicted pause fits. A limit that even a pause with nothing left to
    /// copy cannot fit (round trips, device state, --verify full) is
    /// refused after the first round (exit status 3, guest running here).
    #[arg(help_heading = CONVERGENCE, long, default_value = "300ms", value_parser = units::parse_duration, value_name = "DURATION")]
    pub downtime_limit: Duration,
    /// Pre-copy rounds before giving up on convergence: the migration is
    /// cancelled (exit status 3, guest running here) unless --force-switchover.
    #[arg(help_heading = CONVERGENCE, long, default_value_t = 30)]
    pub max_rounds: u32,
    /// At --max-rounds, switch over anyway with the longer pause.
    #[arg(help_heading = CONVERGENCE, long)]
    pub force_switchover: bool,
    /// When rounds stop shrinking, throttle the guest (20%, then +10% per
    /// round, up to 99%) so it dirties memory more slowly.
    #[arg(help_heading = CONVERGENCE, long)]
    pub auto_converge: bool,
    /// Cancel the migration (exit status 3, guest running here) when
    /// pre-copy has not switched over after this long, e.g. 10m.
    #[arg(help_heading = CONVERGENCE, long, value_parser = units::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Do not encrypt (default: TLS 1.3 on the control connection and on
    /// every TCP data channel, each its own session). Only for a trusted,
    /// isolated migration network, and the destination must allow it
    /// (ferry listen --plaintext). Needed for --performance-option rdma:
    /// RDMA data channels are NOT encrypted (their control connection keeps
    /// TLS).
    #[arg(help_heading = SECURITY, long)]
    pub plaintext: bool,
    /// Encryption is the default: still accepted, changes nothing.
    #[arg(long, hide = true, conflicts_with = "plaintext")]
    pub encrypt: bool,
    /// TLS identity: DIR/ca.pem (the CA the destination's certificate must
    /// chain to), DIR/cert.pem and DIR/key.pem (this host's). Without it,
    /// the identity is derived from the pre-shared key.
    #[arg(help_heading = SECURITY, long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Write a JSON record here: the summary, per-round and per-channel
    /// figures, and a time series sampled every 100 ms (`ferry report`
    /// draws it).
    #[arg(help_heading = OUTPUT, long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the migration's events as JSON lines as they happen (phase
    /// changes, each round's figures, pause start and end, the outcome)
    /// to FILE, or to standard output with `-` (the summary then goes to
    /// stderr).
    #[arg(help_heading = OUTPUT, long, value_name = "FILE|-")]
    pub events: Option<String>,
    /// Without a terminal, log a progress line this often (with a
    /// terminal, the progress line is redrawn in place).
    #[arg(help_heading = OUTPUT, long, default_value = "5s", value_parser = units::parse_duration, value_name = "DURATION")]
    pub progress_interval: Duration,
    /// How the switchover verifies memory. `evidence` (the default): both
    /// sides build keyed evidence of every page as it moves and prove it to
    /// each other in the pause in constant time; after the pause the source
    /// audits its frozen memory against it (catching dirty-tracking misses;
    /// a failed audit exits 5). `full`: also hash the whole guest memory on
    /// both sides inside the pause, as before: about 0.2 s of pause per GiB
    /// on a 2-core host, which the pause budget counts (raise
    /// --downtime-limit).
    #[arg(help_heading = CONVERGENCE, long, value_enum, default_value_t = VerifyArg::Evidence)]
    pub verify: VerifyArg,
}

/// `--verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyArg {
    /// Page evidence proved in the pause, audit after it.
    Evidence,
    /// Also a whole-memory hash on both sides inside the pause.
    Full,
}

impl EngineArgs {
    /// `--performance-option` as given (`auto` before it chose).
    pub fn performance_option_name(&self) -> String {
        self.performance_option
            .to_possible_value()
            .map_or_else(|| "?".into(), |v| v.get_name().to_string())
    }
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Destination HOST[:PORT] (port 6600 when omitted).
    #[arg(help_heading = CONNECTION, long, value_name = "HOST[:PORT]")]
    pub to: String,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// File holding the pre-shared key, as `ferry gen-key FILE` writes it
    /// (the same file as the destination's).
    #[arg(help_heading = SECURITY, long, value_name = "FILE")]
    pub auth_key_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn source_options(e: &EngineArgs) -> anyhow::Result<SourceOptions> {
    if e.downtime_limit.is_zero() {
        bail!("--downtime-limit must be above zero");
    }
    if !e.plaintext && e.performance_option == OptionArg::Rdma {
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
        plaintext: e.plaintext,
        verify: match e.verify {
            VerifyArg::Evidence => Verify::Evidence,
            VerifyArg::Full => Verify::Full,
        },
    })
}
