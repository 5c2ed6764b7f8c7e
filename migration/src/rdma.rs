//! The RDMA performance option, both sides (feature `rdma`): which NICs,
//! the checks made before any page moves, and the set-up around
//! `ferry_transport::rdma`.
//!
//! Order of events (see docs/protocol.md, "RDMA"):
//! * source: finds its RDMA NICs **before connecting** (none: a clear
//!   error, nothing sent); sends `Offer` then `RdmaOffer`;
//! * destination: finds its own, keeps those on a subnet shared with the
//!   source (none: `Reject(Option)` before any memory is allocated), then
//!   allocates, binds listeners, registers guest memory once per device
//!   (memlock failure: `Reject(Option)` naming the limit and the fix), and
//!   answers `Accept` then `RdmaAccept`;
//! * source: checks the region keys against its layout, registers its
//!   memory once per device and connects one queue pair per device pair,
//!   each request carrying its channel's token;
//! * destination: accepts each channel once, with its token, from an
//!   address the source offered; revokes remote write access (deregisters)
//!   at the switchover, on abort and when every channel has ended.

use std::sync::Arc;
use std::time::Duration;

use ferry_transport::conn::Conn;
use ferry_transport::multichannel::{Multichannel, MultichannelConfig};
use ferry_transport::proto::{Msg, RejectReason};
use ferry_transport::rdma::{local_endpoints, RdmaChannelSender, RdmaExposure, RdmaReceiver};
use ferry_transport::rdma_wire::{
    check_offer, shared_endpoints, Admission, RdmaEndpoint, RdmaOffer, RevokeReason,
};
use ferry_transport::{MemoryLayout, TransportError};

use ferry_transport::multichannel::{ChannelCount, Cidr};

use crate::error::{MigrationError, Result};
use crate::memory::{DestMemory, SourceMemory};
use crate::nics::{self, MultichannelOptions};

/// The source's RDMA endpoints (only those at `--nic` addresses, when
/// given), or why `--performance-option rdma` cannot run here (said before
/// anything is sent).
pub fn source_endpoints(mc: &MultichannelOptions) -> Result<Vec<RdmaEndpoint>> {
    let mut eps = local_endpoints().map_err(|e| {
        MigrationError::Config(format!(
            "--performance-option rdma: this host cannot do RDMA: {e}"
        ))
    })?;
    if eps.is_empty() {
        return Err(MigrationError::Config(
            "--performance-option rdma: this host has RDMA devices but none with an IPv4 \
             address (RoCE GID) on a configured interface"
                .into(),
        ));
    }
    if !mc.nics.is_empty() {
        let all: Vec<String> = eps.iter().map(ToString::to_string).collect();
        eps.retain(|e| mc.nics.contains(&e.addr));
        if eps.is_empty() {
            return Err(MigrationError::Config(format!(
                "--performance-option rdma: no RDMA device sits on a --nic address; this \
                 host's RDMA NICs: {}",
                all.join(", ")
            )));
        }
    }
    Ok(eps)
}

/// Source: after `Accept`, reads the destination's `RdmaAccept`, connects
/// every channel (at most `--channels N`) and stripes over them with the
/// multichannel scheduler. A channel with work outstanding and no
/// completion for `--channel-timeout` (or `timeout`, if shorter) fails over
/// to the others. Every connection request carries its channel's token
/// (the session's data-channel key, `migration_id`, the channel's index).
#[allow(clippy::too_many_arguments)]
pub async fn open_source(
    conn: &mut Conn,
    mem: &Arc<SourceMemory>,
    layout: &MemoryLayout,
    local: &[RdmaEndpoint],
    timeout: Duration,
    mc: &MultichannelOptions,
    keys: &ferry_proto::SessionKeys,
    migration_id: u64,
) -> Result<Multichannel> {
    let mut accept = match conn.recv("the destination's RDMA channels").await? {
        Msg::RdmaAccept(a) => a,
        m => {
            return Err(TransportError::Unexpected {
                expected: "RdmaAccept",
                got: m.name().into(),
            }
            .into())
        }
    };
    if let ChannelCount::Fixed(n) = mc.channels {
        accept.channels.truncate(usize::from(n));
    }
    let stall = mc.channel_timeout.min(timeout);
    let chans = RdmaChannelSender::connect_all(
        mem,
        layout,
        local,
        &accept,
        stall,
        keys.frame.clone(),
        &keys.data_channel,
        migration_id,
    )
    .await?;
    tracing::info!(
        "rdma: {} channel(s): {}",
        chans.len(),
        chans
            .iter()
            .map(|(c, _)| c.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Multichannel::new(
        chans,
        MultichannelConfig {
            stall_timeout: stall,
            ..Default::default()
        },
    ))
}

/// What the destination keeps of an RDMA offer: its own endpoints to
/// listen on and the source's addresses (the only ones it admits
/// connection requests from).
#[derive(Debug, Clone)]
pub struct DestRdma {
    /// This host's endpoints on subnets the source shares.
    pub shared: Vec<RdmaEndpoint>,
    /// The source's offered addresses.
    pub peers: Vec<std::net::IpAddr>,
}

/// Destination: reads the `RdmaOffer` that follows an RDMA offer and picks
/// this host's endpoints inside `networks` (`--migration-network`; empty:
/// all) on subnets the source shares. Errors are the rejection to send.
pub async fn dest_endpoints(
    conn: &mut Conn,
    networks: &[Cidr],
) -> std::result::Result<DestRdma, (RejectReason, String)> {
    let offer = match conn.recv("the source's RDMA endpoints").await {
        Ok(Msg::RdmaOffer(o)) => o,
        Ok(m) => {
            return Err((
                RejectReason::BadOffer,
                format!("expected RdmaOffer after an RDMA offer, got {}", m.name()),
            ))
        }
        Err(e) => return Err((RejectReason::BadOffer, e.to_string())),
    };
    let ours = local_endpoints().map(|mut v| {
        v.retain(|e| nics::allowed(networks, e.addr));
        v
    });
    Ok(DestRdma {
        shared: pick_shared(&offer, ours)?,
        peers: offer.endpoints.iter().map(|e| e.addr).collect(),
    })
}

fn pick_shared(
    offer: &RdmaOffer,
    ours: std::result::Result<Vec<RdmaEndpoint>, ferry_ffi::rdma::RdmaError>,
) -> std::result::Result<Vec<RdmaEndpoint>, (RejectReason, String)> {
    check_offer(offer).map_err(|e| (RejectReason::BadOffer, e.to_string()))?;
    let ours = ours.map_err(|e| {
        (
            RejectReason::Option,
            format!("performance option rdma: the destination cannot do RDMA: {e}"),
        )
    })?;
    let shared = shared_endpoints(&ours, &offer.endpoints);
    if shared.is_empty() {
        let list = |v: &[RdmaEndpoint]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err((
            RejectReason::Option,
            format!(
                "performance option rdma: no RDMA NIC of the destination [{}] shares a subnet \
                 with one of the source's [{}]",
                list(&ours),
                list(&offer.endpoints)
            ),
        ));
    }
    Ok(shared)
}

/// Destination: binds listeners and registers guest memory (in protection
/// domains of this migration), admitting on each channel only the request
/// that carries its token (made with `data_channel`, the session's key, for
/// `migration_id`) from one of the source's addresses; errors are the
/// rejection to send (e.g. the memlock limit, named with its fix).
pub fn dest_prepare(
    mem: &Arc<DestMemory>,
    layout: &MemoryLayout,
    rdma: &DestRdma,
    data_channel: &ferry_proto::MacKey,
    migration_id: u64,
) -> std::result::Result<RdmaReceiver<()>, (RejectReason, String)> {
    let admission = Admission::new(
        data_channel.clone(),
        migration_id,
        rdma.shared.len(),
        rdma.peers.clone(),
    );
    RdmaReceiver::prepare(mem, layout, &rdma.shared, admission).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        (RejectReason::Option, msg)
    })
}

/// Revokes a migration's RDMA remote write access when dropped (the
/// destination holds one for as long as it handles the migration: any way
/// out of it, error or abort included, deregisters every region at once;
/// after a commit it was revoked at the switchover already).
#[derive(Debug)]
pub struct RevokeOnDrop(pub RdmaExposure<()>);

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        self.0.revoke(RevokeReason::Abort);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ffi::rdma::RdmaError;

    fn ep(a: &str) -> RdmaEndpoint {
        RdmaEndpoint {
            addr: a.parse().unwrap(),
            prefix: 24,
            device: "rxe0".into(),
            port: 0,
        }
    }

    #[test]
    fn destination_without_rdma_or_shared_subnet_rejects_the_option() {
        let offer = RdmaOffer {
            endpoints: vec![ep("10.77.10.2")],
        };
        let (r, m) = pick_shared(&offer, Err(RdmaError::NoDevice)).unwrap_err();
        assert_eq!(r, RejectReason::Option);
        assert!(m.contains("no RDMA device"), "{m}");
        let (r, m) = pick_shared(&offer, Ok(vec![ep("192.168.1.1")])).unwrap_err();
        assert_eq!(r, RejectReason::Option);
        assert!(m.contains("shares a subnet"), "{m}");
        assert_eq!(
            pick_shared(&offer, Ok(vec![ep("192.168.1.1"), ep("10.77.10.1")])).unwrap(),
            vec![ep("10.77.10.1")]
        );
    }
}
