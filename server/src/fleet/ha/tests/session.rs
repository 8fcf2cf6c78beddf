//! The HA wiring over a real QUIC session with a hand-driven agent: the
//! lease and witness terms first, acks withheld while fenced, witness
//! terms pushed on change, a disk-lock wait shown.

use super::*;

/// Reads the next control-stream frame, or fails after a few seconds.
async fn next_frame(
    recv: &mut novacron_shared::framing::FramedRecv,
) -> novacron_shared::protocol::ServerMessage {
    use novacron_shared::protocol::ServerMessage;
    match tokio::time::timeout(Duration::from_secs(10), recv.next::<ServerMessage>()).await {
        Ok(Ok(Some((_, m)))) => m,
        other => panic!("no frame from the server: {other:?}"),
    }
}

#[tokio::test]
async fn over_a_real_session_terms_come_first_and_acks_stop_when_fenced_until_returned_clean() {
    use novacron_shared::framing::{self, FramedRecv, MAX_FRAME_LEN};
    use novacron_shared::protocol::{
        AgentMessage, Heartbeat, HeartbeatAck, Hello, RenewRequest, ServerMessage, WitnessPeer, WitnessTerms,
        HANDSHAKE_VERSION,
    };

    let dir = tempfile::tempdir().unwrap();
    // TLS checks certificates against the real wall time: start there.
    let manual = Arc::new(ManualClock::starting_at(Clock::system().wall()));
    let clock = Clock::from_source(manual.clone());
    let mut cfg = crate::config::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    let data = crate::datadir::DataDir::new(dir.path());
    data.init(&cfg, clock.wall()).unwrap();
    {
        let store = Store::open(&data.db()).unwrap();
        store.put_hosts(&[host_record(H1), host_record(H2)]).unwrap();
        store.put_vm(&ha_vm(7, H1)).unwrap().unwrap();
    }
    let ca = data.load_ca().unwrap();
    let (key, csr) = novacron_shared::pki::make_csr("h1").unwrap();
    let validity = novacron_shared::pki::Validity::for_ttl(clock.wall(), Duration::from_secs(3600));
    let cert = ca.sign_host_csr(&csr, H1, validity).unwrap();
    let running = crate::start_with_clock(&cfg, clock).await.unwrap();
    let f = running.fleet.clone();

    let tls = novacron_shared::tls::client_config_mtls(
        ca.cert_der().clone(),
        vec![cert],
        novacron_shared::pki::key_from_pem(&key.serialize_pem()).unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(tls, running.quic_addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = FramedRecv::new(recv, MAX_FRAME_LEN);
    let mut buf = Vec::new();
    let hello = AgentMessage::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "test".into(),
        hostname: "h1".into(),
    });
    framing::write_frame(&mut send, HANDSHAKE_VERSION, &hello, &mut buf)
        .await
        .unwrap();
    assert!(matches!(next_frame(&mut recv).await, ServerMessage::Welcome(_)));
    match next_frame(&mut recv).await {
        ServerMessage::LeaseTerms(t) => assert_eq!(t, f.ha_config().terms()),
        m => panic!("the lease terms come right after the welcome, got {m:?}"),
    }
    // The witness terms right after: H2 (enrolled, silent) reports no
    // witness address yet, so no peer; quorum of two monitored hosts.
    let quorum = novacron_shared::witness::quorum(2);
    match next_frame(&mut recv).await {
        ServerMessage::Witness(w) => assert_eq!(
            w,
            WitnessTerms {
                peers: vec![],
                quorum,
                grace_ms: 1_500,
            }
        ),
        m => panic!("the witness terms come right after the lease terms, got {m:?}"),
    }
    match next_frame(&mut recv).await {
        ServerMessage::DesiredState(d) => {
            assert_eq!(d.vms.iter().map(|v| v.id).collect::<Vec<_>>(), [VmId(7)])
        }
        m => panic!("then the desired state, got {m:?}"),
    }
    // H2 reports a witness address: H1 is pushed new terms with it.
    let addr: std::net::SocketAddr = "10.0.0.2:7300".parse().unwrap();
    f.witness_address(H2, Some(addr));
    match next_frame(&mut recv).await {
        ServerMessage::Witness(w) => assert_eq!(
            w,
            WitnessTerms {
                peers: vec![WitnessPeer { host: H2, addr }],
                quorum,
                grace_ms: 1_500,
            }
        ),
        m => panic!("new witness terms when a peer's address changes, got {m:?}"),
    }
    // The same address again changes nothing (no frame: the probe's
    // error reply comes first below).
    f.witness_address(H2, Some(addr));
    assert_eq!(f.witness_status().peers, 1);
    assert!(f.witness_status().enabled && f.witness_status().pushes >= 1);
    let beat = |seq| {
        AgentMessage::Heartbeat(Heartbeat {
            seq,
            lease_left_ms: None,
        })
    };
    // A garbage renewal always gets an error reply: after a heartbeat it
    // shows whether an ack came first.
    let probe = || {
        AgentMessage::RenewCertificate(RenewRequest {
            csr_der: vec![1, 2, 3],
        })
    };
    for m in [beat(1), probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    assert_eq!(
        next_frame(&mut recv).await,
        ServerMessage::HeartbeatAck(HeartbeatAck { seq: 1 })
    );
    assert!(matches!(next_frame(&mut recv).await, ServerMessage::Error(_)));

    // Silent past the fence wait: declared fenced; heartbeats go unanswered.
    manual.advance(f.ha_fence_wait() + Duration::from_millis(100));
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Fenced));
    // A snapshot revert (which may start the HA VM) is refused while the
    // host holds no lease; it never reaches the agent.
    let revert = novacron_shared::protocol::CommandKind::SnapshotRevert {
        vm: VmId(7),
        name: "s1".into(),
    };
    let r = f.command(H1, revert, Duration::from_secs(5)).await;
    assert!(
        matches!(r, Err(crate::fleet::CommandError::NoLease(h)) if h == H1),
        "{r:?}"
    );
    for m in [beat(2), probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    match next_frame(&mut recv).await {
        ServerMessage::Error(_) => {}
        m => panic!("no ack for a fenced host, got {m:?}"),
    }
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Returning));
    for m in [beat(3), probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    match next_frame(&mut recv).await {
        ServerMessage::Error(_) => {}
        m => panic!("no ack for a returning host, got {m:?}"),
    }
    assert!(matches!(f.returned_clean(H1), Err(HaError::NotReconciled(H1))));

    // The agent reports an inventory and a converged pass at the current
    // generation: reconciled, so the controller may clear it; acks resume.
    let generation = f.store().desired(H1).unwrap().unwrap().generation;
    let mut changes = f.lease_changes();
    changes.borrow_and_update();
    let inventory = AgentMessage::Inventory(novacron_shared::protocol::Inventory {
        capacity: Capacity {
            cpus: 4,
            memory_mib: 4096,
            ..Capacity::default()
        },
        hypervisor: "test:///default".into(),
        vms: vec![],
        migration_uri: None,
        labels: Default::default(),
        shared_storage: Some("/srv/pool".into()),
        disk_locks: None,
        witness: None,
    });
    let report = AgentMessage::Reconciled(novacron_shared::protocol::ReconcileReport {
        generation,
        converged: true,
        actions: vec![],
        drift: vec![],
    });
    for m in [inventory, report, probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    assert!(matches!(next_frame(&mut recv).await, ServerMessage::Error(_)));
    assert!(
        changes.has_changed().unwrap(),
        "inventories and reports wake the driver"
    );
    // The running server's HA driver sees it reconciled and clears it
    // (the view may already show it cleared).
    let view = f.view().unwrap();
    let h = view.host(H1).unwrap();
    assert_eq!(h.shared_storage.as_deref(), Some("/srv/pool"));
    assert!(h.reconciled || h.lease == HostState::Online, "{h:?}");
    match next_frame(&mut recv).await {
        ServerMessage::DesiredState(d) => assert!(d.generation > generation && d.departed.is_empty()),
        m => panic!("the cleared host gets its desired state, got {m:?}"),
    }
    framing::write_frame(&mut send, 1, &beat(4), &mut buf)
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut recv).await,
        ServerMessage::HeartbeatAck(HeartbeatAck { seq: 4 })
    );

    // The HA VM's start waits on its disk lock: an expected wait, shown
    // in the HA status (and so on the VM), not an error.
    let mut events = f.bus.subscribe();
    let report = AgentMessage::Reconciled(novacron_shared::protocol::ReconcileReport {
        generation: generation + 1,
        converged: false,
        actions: vec![],
        drift: vec![novacron_shared::protocol::Drift {
            vm: "v7".into(),
            message: "Failed to acquire lock: resource busy".into(),
            kind: novacron_shared::protocol::DriftKind::DiskLockHeld,
        }],
    });
    framing::write_frame(&mut send, 1, &report, &mut buf)
        .await
        .unwrap();
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(w) = f.ha_status().lock_waits.get(&VmId(7)).copied() {
                return w;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the driver shows the lock wait");
    assert_eq!(wait.host, H1);
    assert_eq!(wait.describe(), format!("disk lock held (on host {H1})"));
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.vm == Some(VmId(7)) && e.message.contains("disk lock") {
                return e;
            }
        }
    })
    .await
    .expect("one event when the wait begins");
    assert!(event.message.contains("not an error"), "{}", event.message);
    running.shutdown().await;
}
