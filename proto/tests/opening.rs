//! The opening of a migration ([`ferry_proto::opening`]) driven in
//! memory: the source's `Hello` (from its handshake machine) and offer go
//! to a destination's opening with given flags, its answers come back to
//! the source's. Each scenario checks what both sides conclude: the
//! source's `Accept` or the exact `Reject` it hears, and that the
//! destination accepts only an offer that passed every check, only after
//! authentication.

use ferry_proto::control::{
    GuestConfig, Msg, Offer, RejectReason, Role, PROTOCOL_MAX, PROTOCOL_MIN,
};
use ferry_proto::layout::MemoryLayout;
use ferry_proto::net::{NetInterface, MAX_CHANNELS};
use ferry_proto::opening::{
    unknown_channel, Admission, DestOpening, ExpectedChannels, GuestSupport, Hello, HelloRefusal,
    OfferError, Offered, SourceOpening, CHANNELS_ALL_OPEN, CHANNEL_NOT_ENCRYPTED, CHANNEL_UNKNOWN,
};
use ferry_proto::option::PerformanceOption;
use ferry_proto::policy;
use ferry_proto::rdma::RdmaOffer;
use ferry_proto::relay::RelayOffer;
use ferry_proto::session::{Credential, HandshakeError, SessionError, SourceHandshake};

const GIB: u64 = 1 << 30;

fn admission() -> Admission {
    Admission {
        plaintext_allowed: false,
        memory_limit: 4 * GIB,
        rdma: true,
        supports: GuestSupport {
            max_vcpus: 8,
            cpu_vendor: Some("GenuineIntel".into()),
            device_state_formats: vec!["ferry-synthetic-v1".into()],
        },
    }
}

fn offer() -> Offer {
    Offer {
        layout: MemoryLayout::from_regions([(0, GIB), (4 * GIB, GIB)]),
        guest: GuestConfig {
            vcpus: 4,
            cpu_vendor: "GenuineIntel".into(),
            device_state_format: "ferry-synthetic-v1".into(),
        },
        option: PerformanceOption::Tcp,
        channels: 4,
    }
}

fn interfaces() -> Vec<NetInterface> {
    vec![NetInterface {
        name: "eth1".into(),
        addr: "10.0.0.2".parse().unwrap(),
        prefix: 24,
        speed_mbps: Some(10_000),
        rdma: None,
    }]
}

/// The source's hello, as its handshake machine sends it.
fn hello(role: Role) -> Msg {
    SourceHandshake::new(role, Credential::Psk(vec![1; 32]), vec![], [7; 32]).1
}

/// What the destination did with the offer.
#[derive(Debug, PartialEq)]
enum Dest {
    Accepted(u64),
    Refused(RejectReason),
}

/// A control connection (`encrypted` or not) to a destination admitting
/// `adm` carries `offer` (and `rdma`): returns the source's outcome, the
/// destination's, and the messages the source sent.
fn open(
    adm: Admission,
    offer: Offer,
    rdma: Option<RdmaOffer>,
    encrypted: bool,
) -> (
    Result<ferry_proto::control::Accept, HandshakeError>,
    Dest,
    Vec<Msg>,
) {
    let mut d = DestOpening::new(adm);
    let h = d.on_hello(hello(Role::Control), encrypted).unwrap();
    assert_eq!(
        h,
        Hello {
            version: PROTOCOL_MAX,
            role: Role::Control,
            nonce: [7; 32]
        }
    );
    // (The handshake runs here: `DestHandshake`, tested in session.rs.)
    d.authenticated().unwrap();
    let (mut s, sent) = SourceOpening::new(offer, rdma);
    let mut msgs = sent.clone().into_iter();
    let (answer, dest) = match d.on_offer(msgs.next().unwrap(), encrypted) {
        Ok(Offered::Migration(o)) => {
            assert_eq!(Msg::Offer(o), sent[0], "the offer reaches the driver whole");
            assert!(!d.is_accepted());
            (d.accept(42, interfaces()).unwrap(), Dest::Accepted(42))
        }
        Ok(Offered::Relay(_)) => panic!("not a relay"),
        Err(OfferError::Refused(r)) => {
            let reason = r.reason;
            (r.reject(), Dest::Refused(reason))
        }
        Err(OfferError::Session(e)) => panic!("{e}"),
    };
    assert_eq!(d.is_accepted(), matches!(dest, Dest::Accepted(_)));
    let got = s.on_answer(answer);
    assert_eq!(s.is_accepted(), got.is_ok());
    (got, dest, sent)
}

#[test]
fn an_offer_that_passes_every_check_is_accepted() {
    let (got, dest, sent) = open(admission(), offer(), None, true);
    assert_eq!(dest, Dest::Accepted(42));
    let accept = got.unwrap();
    assert_eq!(accept.migration_id, 42);
    assert_eq!(accept.interfaces, interfaces());
    assert_eq!(sent.len(), 1, "no RDMA offer without RDMA");
    // At the limits: the whole --memory-limit, MAX_CHANNELS channels, the
    // most vCPUs, zstd's top level.
    let edge = Offer {
        layout: MemoryLayout::from_regions([(0, 4 * GIB)]),
        channels: MAX_CHANNELS,
        guest: GuestConfig {
            vcpus: 8,
            ..offer().guest
        },
        option: PerformanceOption::Compression {
            codec: 2,
            level: 19,
        },
    };
    assert_eq!(open(admission(), edge, None, true).1, Dest::Accepted(42));
}

#[test]
fn the_rdma_offer_follows_the_offer() {
    let rdma = RdmaOffer { endpoints: vec![] };
    let plain = Admission {
        plaintext_allowed: true,
        ..admission()
    };
    let o = Offer {
        option: PerformanceOption::Rdma,
        ..offer()
    };
    let (got, _, sent) = open(plain, o, Some(rdma.clone()), true);
    got.unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1], Msg::RdmaOffer(rdma));
}

/// An offer changed by `edit`, to a destination changed by `adm`: the
/// reason the source hears and its message.
fn refused(
    adm: impl FnOnce(&mut Admission),
    edit: impl FnOnce(&mut Offer),
    encrypted: bool,
) -> (RejectReason, String) {
    let mut a = admission();
    adm(&mut a);
    let mut o = offer();
    edit(&mut o);
    let (got, dest, _) = open(a, o, None, encrypted);
    let Err(HandshakeError::Rejected { reason, message }) = got else {
        panic!("accepted: {got:?}")
    };
    assert_eq!(dest, Dest::Refused(reason), "both sides agree");
    (reason, message)
}

#[test]
fn each_check_refuses_with_its_reason_and_names_the_cause() {
    use RejectReason::*;
    let same = |_: &mut Admission| {};
    let cases: Vec<(RejectReason, &str, (RejectReason, String))> = vec![
        (
            BadOffer,
            "no regions",
            refused(same, |o| o.layout = MemoryLayout::from_regions([]), true),
        ),
        (
            BadOffer,
            "not page aligned",
            refused(
                same,
                |o| o.layout = MemoryLayout::from_regions([(1, GIB)]),
                true,
            ),
        ),
        (
            MemoryLimit,
            "above this destination's --memory-limit of 4.00 GiB (4294967296 bytes)",
            refused(
                same,
                |o| o.layout = MemoryLayout::from_regions([(0, 5 * GIB)]),
                true,
            ),
        ),
        (
            Encryption,
            policy::RDMA_NEEDS_PLAINTEXT_DEST,
            refused(same, |o| o.option = PerformanceOption::Rdma, true),
        ),
        (
            Encryption,
            policy::RDMA_NEEDS_TLS_CONTROL,
            refused(
                |a| a.plaintext_allowed = true,
                |o| o.option = PerformanceOption::Rdma,
                false,
            ),
        ),
        (
            Option,
            "performance option rdma is not available on this destination",
            refused(
                |a| {
                    a.plaintext_allowed = true;
                    a.rdma = false
                },
                |o| o.option = PerformanceOption::Rdma,
                true,
            ),
        ),
        (
            Option,
            "compression option",
            refused(
                same,
                |o| o.option = PerformanceOption::Compression { codec: 9, level: 0 },
                true,
            ),
        ),
        (
            Option,
            "zstd level 20",
            refused(
                same,
                |o| {
                    o.option = PerformanceOption::Compression {
                        codec: 2,
                        level: 20,
                    }
                },
                true,
            ),
        ),
        (
            GuestConfig,
            "0 vCPUs",
            refused(same, |o| o.guest.vcpus = 0, true),
        ),
        (
            GuestConfig,
            "9 vCPUs, this destination restores at most 8",
            refused(same, |o| o.guest.vcpus = 9, true),
        ),
        (
            GuestConfig,
            "CPU vendor \"AuthenticAMD\"",
            refused(same, |o| o.guest.cpu_vendor = "AuthenticAMD".into(), true),
        ),
        (
            GuestConfig,
            "device-state format \"qemu-9\"",
            refused(
                same,
                |o| o.guest.device_state_format = "qemu-9".into(),
                true,
            ),
        ),
        (
            BadOffer,
            "0 data channels requested (1 to 64 allowed)",
            refused(same, |o| o.channels = 0, true),
        ),
        (
            BadOffer,
            "65 data channels requested (1 to 64 allowed)",
            refused(same, |o| o.channels = MAX_CHANNELS + 1, true),
        ),
    ];
    for (reason, words, (got, message)) in cases {
        assert_eq!(got, reason, "{message}");
        assert!(message.contains(words), "{words:?} not in {message:?}");
    }
}

#[test]
fn the_first_check_that_fails_is_the_one_named() {
    // Too large, a guest it cannot restore and no channels: the memory
    // limit comes first.
    let (reason, _) = refused(
        |_| {},
        |o| {
            o.layout = MemoryLayout::from_regions([(0, 8 * GIB)]);
            o.guest.vcpus = 0;
            o.channels = 0;
        },
        true,
    );
    assert_eq!(reason, RejectReason::MemoryLimit);
    // Any vendor when the destination names none.
    let (got, ..) = {
        let mut a = admission();
        a.supports.cpu_vendor = None;
        let mut o = offer();
        o.guest.cpu_vendor = "AuthenticAMD".into();
        open(a, o, None, true)
    };
    assert!(got.is_ok());
}

#[test]
fn the_hello_is_checked_before_anything_else() {
    let refusal = |adm: Admission, msg: Msg, encrypted: bool| {
        let mut d = DestOpening::new(adm);
        let e = d.on_hello(msg, encrypted).unwrap_err();
        // Refused: nothing after it is taken.
        assert!(d.authenticated().is_err());
        assert!(d.accept(1, vec![]).is_err());
        e
    };
    let e = refusal(admission(), Msg::Ping { seq: 3 }, true);
    assert_eq!(e, HelloRefusal::NotHello { got: "Ping" });
    assert_eq!(
        e.refusal().reject(),
        Msg::Reject {
            reason: RejectReason::BadOffer,
            message: "expected Hello, got Ping".into()
        }
    );
    let future = Msg::Hello {
        min_version: PROTOCOL_MAX + 1,
        max_version: PROTOCOL_MAX + 5,
        role: Role::Control,
        nonce: [0; 32],
    };
    let e = refusal(admission(), future, true);
    assert_eq!(
        e,
        HelloRefusal::Version {
            peer_min: PROTOCOL_MAX + 1,
            peer_max: PROTOCOL_MAX + 5
        }
    );
    let r = e.refusal();
    assert_eq!(r.reason, RejectReason::Version);
    assert_eq!(
        r.message,
        format!(
            "unsupported protocol version: peer speaks {}..={}, this host speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}",
            PROTOCOL_MAX + 1,
            PROTOCOL_MAX + 5
        )
    );
    // A plain connection without --plaintext: refused whatever its role.
    for role in [Role::Control, Role::Data] {
        let e = refusal(admission(), hello(role), false);
        assert_eq!(e, HelloRefusal::Unencrypted);
        assert_eq!(e.refusal().reason, RejectReason::Encryption);
        assert_eq!(e.refusal().message, policy::ENCRYPTION_REQUIRED);
    }
    // With --plaintext it is taken.
    let mut d = DestOpening::new(Admission {
        plaintext_allowed: true,
        ..admission()
    });
    assert_eq!(
        d.on_hello(hello(Role::Control), false).unwrap().role,
        Role::Control
    );
}

#[test]
fn nothing_is_offered_or_accepted_out_of_turn() {
    // An offer before the handshake succeeded.
    let mut d = DestOpening::new(admission());
    d.on_hello(hello(Role::Control), true).unwrap();
    assert!(matches!(
        d.on_offer(Msg::Offer(offer()), true),
        Err(OfferError::Session(SessionError::OutOfOrder { .. }))
    ));
    assert!(d.accept(1, vec![]).is_err(), "and the opening is over");
    // A data channel's hello: its own handshake follows, never an offer.
    let mut d = DestOpening::new(admission());
    assert_eq!(
        d.on_hello(hello(Role::Data), true).unwrap().role,
        Role::Data
    );
    assert!(d.authenticated().is_err());
    // A second hello.
    let mut d = DestOpening::new(admission());
    d.on_hello(hello(Role::Control), true).unwrap();
    assert!(d.on_hello(hello(Role::Control), true).is_err());
    // Accept before the offer; a second accept.
    let mut d = DestOpening::new(admission());
    d.on_hello(hello(Role::Control), true).unwrap();
    d.authenticated().unwrap();
    assert!(d.accept(1, vec![]).is_err());
    let mut d = DestOpening::new(admission());
    d.on_hello(hello(Role::Control), true).unwrap();
    d.authenticated().unwrap();
    d.on_offer(Msg::Offer(offer()), true).unwrap();
    d.accept(1, vec![]).unwrap();
    assert!(d.accept(2, vec![]).is_err());
    // A refused offer is never accepted.
    let mut d = DestOpening::new(admission());
    d.on_hello(hello(Role::Control), true).unwrap();
    d.authenticated().unwrap();
    let bad = Offer {
        channels: 0,
        ..offer()
    };
    assert!(matches!(
        d.on_offer(Msg::Offer(bad), true),
        Err(OfferError::Refused(_))
    ));
    assert!(d.accept(1, vec![]).is_err());
    assert!(!d.is_accepted());
}

#[test]
fn anything_but_an_offer_ends_the_opening_unanswered_and_a_relay_passes_through() {
    let authenticated = || {
        let mut d = DestOpening::new(admission());
        d.on_hello(hello(Role::Control), true).unwrap();
        d.authenticated().unwrap();
        d
    };
    let mut d = authenticated();
    assert_eq!(
        d.on_offer(Msg::Ping { seq: 1 }, true),
        Err(OfferError::Session(SessionError::Unexpected {
            expected: "Offer",
            got: "Ping"
        }))
    );
    assert!(d.accept(1, vec![]).is_err());
    let relay = RelayOffer {
        deliver_to: "127.0.0.1:4000".into(),
        max_streams: 4,
        window: 1 << 20,
        chunk: 1 << 16,
        option: PerformanceOption::Tcp,
        channels: 1,
    };
    let mut d = authenticated();
    assert_eq!(
        d.on_offer(Msg::RelayOffer(relay.clone()), true),
        Ok(Offered::Relay(relay))
    );
}

#[test]
fn the_source_takes_one_answer_an_accept_or_a_reject() {
    let fresh = || SourceOpening::new(offer(), None).0;
    assert_eq!(
        fresh().on_answer(Msg::Pong { seq: 0 }),
        Err(HandshakeError::Unexpected {
            expected: "Accept or Reject",
            got: "Pong"
        })
    );
    assert_eq!(
        fresh().on_answer(Msg::Reject {
            reason: RejectReason::Busy,
            message: "full".into()
        }),
        Err(HandshakeError::Rejected {
            reason: RejectReason::Busy,
            message: "full".into()
        })
    );
    let mut s = fresh();
    let accept = ferry_proto::control::Accept {
        migration_id: 7,
        interfaces: vec![],
    };
    assert_eq!(s.on_answer(Msg::Accept(accept.clone())), Ok(accept.clone()));
    assert!(s.is_accepted());
    assert!(s.on_answer(Msg::Accept(accept)).is_err(), "a second answer");
    assert!(!s.is_accepted());
}

#[test]
fn arbitrary_openings_never_panic_nor_accept_what_they_must_not() {
    // What the `session` fuzz target runs (`fuzz_opening`), on
    // pseudo-random inputs here.
    for n in 0u32..3000 {
        ferry_proto::session_fuzz::fuzz_opening(&ferry_proto::session_fuzz::pseudo_random(
            n,
            (n % 200) as usize,
        ));
    }
    // The honest order with random flags, offers and hellos: the
    // destination takes (and the oracle checks) many offers, refuses
    // many others.
    let (mut taken, mut accepted) = (0, 0);
    for n in 0u32..3000 {
        let r = ferry_proto::session_fuzz::pseudo_random(n, 40);
        let mut ops = r[..23].to_vec(); // flags, limit, vCPUs; the offer
        ops.extend_from_slice(&[0, r[23] % 2]); // a hello...
        ops.extend_from_slice(&r[24..29]); // ...of random versions, role, nonce
        ops.extend_from_slice(&[1, 2, 3]); // authenticated, the offer, accept
        ops.extend_from_slice(&r[29..37]); // its id
        ops.push(4); // the answer to the source
        let (t, a) = ferry_proto::session_fuzz::fuzz_opening(&ops);
        taken += usize::from(t);
        accepted += usize::from(a);
    }
    assert_eq!(
        taken, accepted,
        "every offer taken in this order is accepted"
    );
    assert!((30..2970).contains(&taken), "{taken} of 3000 offers taken");
}

#[test]
fn the_opening_fuzz_driver_reaches_an_honest_accept() {
    let ops: Vec<u8> = vec![
        0b1011, // --plaintext, RDMA built, encrypted
        255,    // --memory-limit 255 << 26 (~17 GB)
        7,      // at most 7 vCPUs
        // The source's offer: one region of 1 GiB at 0, 2 vCPUs of the
        // vendor, format v1, tcp, 4 channels.
        1, 0, 0, 1, 18, 2, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        // A control hello at our version (offsets around it: 1 is ours;
        // a role byte not a multiple of 4 is a control connection).
        0, 0, 1, 1, 1, 9, 9, 1, // authenticated
        2, // the offer reaches the destination
        3, 0, 0, 0, 0, 0, 0, 0, 42, // Accept(42)
        4,  // the Accept reaches the source
    ];
    assert_eq!(ferry_proto::session_fuzz::fuzz_opening(&ops), (true, true));
    // Without the handshake's success the offer is never taken.
    let mut no_auth = ops.clone();
    let at = ops.len() - 12;
    assert_eq!(no_auth.remove(at), 1);
    assert_eq!(
        ferry_proto::session_fuzz::fuzz_opening(&no_auth),
        (false, false)
    );
}

#[test]
fn a_migration_admits_the_data_channels_it_offered_and_no_more() {
    // Accepted with the offer's channel count, encrypted like its control
    // connection.
    let mut d = DestOpening::new(admission());
    d.on_hello(hello(Role::Control), true).unwrap();
    d.authenticated().unwrap();
    let Ok(Offered::Migration(o)) = d.on_offer(
        Msg::Offer(Offer {
            channels: 2,
            ..offer()
        }),
        true,
    ) else {
        panic!("refused")
    };
    let mut expected = ExpectedChannels {
        left: o.channels,
        encrypted: true,
    };
    // A plain channel is refused and counts against nothing.
    let r = expected.admit(false).unwrap_err();
    assert_eq!(
        (r.reason, r.message.as_str()),
        (RejectReason::Encryption, CHANNEL_NOT_ENCRYPTED)
    );
    assert_eq!(expected.left, 2);
    expected.admit(true).unwrap();
    expected.admit(true).unwrap();
    let r = expected.admit(true).unwrap_err();
    assert_eq!(
        (r.reason, r.message.as_str()),
        (RejectReason::Token, CHANNELS_ALL_OPEN)
    );
    assert_eq!(expected.left, 0);
    // A plain migration takes plain and encrypted channels alike.
    let mut plain = ExpectedChannels {
        left: 2,
        encrypted: false,
    };
    plain.admit(false).unwrap();
    plain.admit(true).unwrap();
    // A proof that names no migration.
    let r = unknown_channel();
    assert_eq!(
        (r.reason, r.message.as_str()),
        (RejectReason::Token, CHANNEL_UNKNOWN)
    );
    assert!(matches!(
        r.reject(),
        Msg::Reject {
            reason: RejectReason::Token,
            ..
        }
    ));
}
