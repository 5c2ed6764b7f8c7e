//! Examples shown under `--help`, in the style of cargo and kubectl.

pub const TOP_EXAMPLES: &str = "\
Examples:
  # Once: a pre-shared key for both hosts (copy it with scp -p)
  ferry gen-key /etc/ferry/key

  # On the destination host: accept migrations (Ctrl-C or SIGTERM stops it cleanly)
  ferry listen --auth-key-file /etc/ferry/key

  # On the source host: migrate a 4 GiB guest, pausing it at most ~300 ms
  ferry send --to dst-host --auth-key-file /etc/ferry/key --memory 4GiB

  # Try it on one machine (both ends over loopback)
  ferry demo

See 'ferry <command> --help' for a command's options, grouped by what they set.
Units: an i means binary (4GiB = 4Gi = 4 x 2^30 bytes), none decimal (4GB = 4G = 4 x 10^9);
rates are per second (64MB/s, 1GiB/s) or bits (1Gbit/s, 500Mbps); durations need a unit (300ms, 2s, 10m).";

pub const LISTEN_EXAMPLES: &str = "\
Examples:
  # Accept migrations on every address, port 6600
  ferry listen --auth-key-file /etc/ferry/key

  # Only the migration network, at most 64 GiB of guests at once, Prometheus metrics
  ferry listen --listen 10.0.0.2:6600 --migration-network 10.0.0.0/24 \\
      --auth-key-file /etc/ferry/key --memory-limit 64GiB --metrics 127.0.0.1:9660

  # TLS identities from certificates ('ferry gen-certs') instead of the key
  ferry listen --auth-key-file /etc/ferry/key --tls-dir /etc/ferry/tls

  # A trusted, isolated migration network: also accept unencrypted sources and RDMA
  ferry listen --listen 10.0.0.2:6600 --auth-key-file /etc/ferry/key --plaintext";

pub const SEND_EXAMPLES: &str = "\
Examples:
  # Migrate a 4 GiB guest to dst-host (port 6600)
  ferry send --to dst-host --auth-key-file /etc/ferry/key --memory 4GiB

  # Keep under 90% of a 1 Gbit/s link, give up after 10 minutes, keep a record
  ferry send --to dst-host --auth-key-file /etc/ferry/key \\
      --bandwidth-limit 900Mbit/s --timeout 10m --json run.json

  # A busy guest: throttle it until the pause fits 500 ms
  ferry send --to dst-host --auth-key-file /etc/ferry/key --dirty-rate 200MB/s \\
      --auto-converge --downtime-limit 500ms

  # Plain TCP (encrypted, as always unless --plaintext), four data channels
  ferry send --to dst-host --auth-key-file /etc/ferry/key \\
      --performance-option tcp --channels 4

  # RDMA on a trusted, isolated network (unencrypted: --plaintext on both ends)
  ferry send --to 10.0.0.2 --auth-key-file /etc/ferry/key --plaintext \\
      --performance-option rdma";

pub const DEMO_EXAMPLES: &str = "\
Examples:
  # A 1 GiB guest dirtying 64 MB/s, both ends in this process
  ferry demo

  # A smaller, idle guest over plain TCP
  ferry demo --memory 256MiB --dirty-rate 0 --performance-option tcp";

pub const NICS_EXAMPLES: &str = "\
Examples:
  # Which interfaces could carry a migration
  ferry nics

  # What 'ferry listen --migration-network 10.0.0.0/24' would advertise
  ferry nics --migration-network 10.0.0.0/24";

pub const REPORT_EXAMPLES: &str = "\
Examples:
  # Summarise a record and draw it
  ferry send --to dst-host --auth-key-file key --json run.json
  ferry report run.json --svg run.svg";

pub const GEN_KEY_EXAMPLES: &str = "\
Examples:
  # A key for a pair of hosts, copied to the other keeping its mode
  ferry gen-key /etc/ferry/key
  scp -p /etc/ferry/key dst-host:/etc/ferry/key";

pub const GEN_CERTS_EXAMPLES: &str = "\
Examples:
  # A new CA and a certificate for this host
  ferry gen-certs /etc/ferry/tls

  # A certificate for a second host, signed by the same CA
  ferry gen-certs host2-tls --ca /etc/ferry/tls";
