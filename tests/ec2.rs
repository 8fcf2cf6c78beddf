//! The EC2 driver (`novacron-ec2`) against moto's real EC2 server on
//! loopback, and through the fault proxy where a fault moto cannot make is
//! needed (throttling, server errors, a lost answer). Needs moto (installed
//! by `packaging/dev/moto.sh`, which the harness runs; a failed install
//! fails the test).

#![allow(clippy::unwrap_used)]
// The harness times real processes (see harness.rs).
#![allow(clippy::disallowed_methods)]

// Included here, not in the harness library: they link the EC2 SDK.
#[allow(dead_code)]
#[path = "harness/faultproxy.rs"]
mod faultproxy;
#[allow(dead_code)]
#[path = "harness/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::time::Duration;

use faultproxy::{Fault, FaultProxy};
use moto::{Moto, SECRET_ACCESS_KEY};
use novacron_cloud::{InstanceState, LaunchSpec, Provider, ProviderError, TAG_FLEET, TAG_LAUNCH, TAG_VM};
use novacron_ec2::credentials::{self, CredentialSource};
use novacron_ec2::Ec2;

const USER_DATA: &str = "#cloud-config\nhostname: burst-1\nruncmd:\n  - [echo, \"héllo, EC2\"]\n";

fn spec(launch_id: &str, vm: &str, fleet: &str, image: &str) -> LaunchSpec {
    LaunchSpec {
        launch_id: launch_id.into(),
        instance_type: "t3.small".into(),
        image: image.into(),
        user_data: None,
        subnet: None,
        security_groups: Vec::new(),
        key_name: None,
        tags: BTreeMap::from([
            (TAG_VM.to_owned(), vm.to_owned()),
            (TAG_FLEET.to_owned(), fleet.to_owned()),
            (TAG_LAUNCH.to_owned(), launch_id.to_owned()),
            ("Name".to_owned(), format!("novacron-{vm}")),
        ]),
    }
}

fn driver(moto: &Moto, endpoint: &str) -> Ec2 {
    Ec2::new(moto.settings(endpoint)).unwrap()
}

#[tokio::test]
async fn a_launch_carries_type_image_tags_user_data_and_network() {
    let moto = Moto::start();
    let net = moto.network();
    let ec2 = driver(&moto, &moto.endpoint());
    let mut s = spec("launch-0001", "vm-1", "fleet-a", &moto.image());
    s.user_data = Some(USER_DATA.into());
    s.subnet = Some(net.subnet.clone());
    s.security_groups = vec![net.security_group.clone()];
    s.key_name = Some("novacron-key".into());
    let got = ec2.launch(&s).await.unwrap();
    assert!(got.id.starts_with("i-"), "{got:?}");
    assert_eq!(
        (got.instance_type.as_str(), got.image.as_str()),
        ("t3.small", s.image.as_str())
    );
    assert_eq!(got.tags, s.tags);
    assert!(got.launched_ms.is_some() && got.private_ip.is_some(), "{got:?}");

    let back = moto.instance(&got.id).unwrap();
    assert_eq!(back.instance_type, "t3.small");
    assert_eq!(back.image, s.image);
    assert_eq!(back.tags, s.tags);
    assert_eq!(back.user_data.as_deref(), Some(USER_DATA));
    assert_eq!(back.subnet.as_deref(), Some(net.subnet.as_str()));
    assert_eq!(back.security_groups, vec![net.security_group.clone()]);
    assert_eq!(back.key_name.as_deref(), Some("novacron-key"));
    assert_eq!(back.state, "running");
    assert_eq!(moto.instances().len(), 1);
}

#[tokio::test]
async fn describe_list_start_stop_and_terminate() {
    let moto = Moto::start();
    let ec2 = driver(&moto, &moto.endpoint());
    let image = moto.image();
    let a = ec2
        .launch(&spec("launch-a", "vm-a", "fleet-a", &image))
        .await
        .unwrap();
    let b = ec2
        .launch(&spec("launch-b", "vm-b", "fleet-a", &image))
        .await
        .unwrap();
    let other = moto.create_instance(&[(TAG_FLEET, "fleet-b")]);

    // Unknown ids are left out, not an error.
    let unknown = "i-0123456789abcdef0".to_owned();
    let got = ec2
        .describe(&[a.id.clone(), unknown.clone(), b.id.clone()])
        .await
        .unwrap();
    let mut ids: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![a.id.as_str(), b.id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(got.iter().all(|i| i.state == InstanceState::Running), "{got:?}");
    assert_eq!(
        ec2.describe(std::slice::from_ref(&unknown)).await.unwrap(),
        Vec::new()
    );

    let mut fleet: Vec<String> = ec2
        .list_by_tag(TAG_FLEET, "fleet-a")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    fleet.sort_unstable();
    assert_eq!(fleet, want);
    let by_launch = ec2.list_by_tag(TAG_LAUNCH, "launch-b").await.unwrap();
    assert_eq!(
        by_launch.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec![b.id.as_str()]
    );
    assert_eq!(ec2.list_by_tag(TAG_FLEET, "fleet-b").await.unwrap()[0].id, other);
    assert!(ec2.list_by_tag(TAG_FLEET, "fleet-none").await.unwrap().is_empty());

    ec2.stop(&a.id).await.unwrap();
    assert_eq!(moto.instance(&a.id).unwrap().state, "stopped");
    let a_now = &ec2.describe(std::slice::from_ref(&a.id)).await.unwrap()[0];
    assert_eq!(a_now.state, InstanceState::Stopped);
    ec2.start(&a.id).await.unwrap();
    assert_eq!(moto.instance(&a.id).unwrap().state, "running");

    ec2.terminate(&b.id).await.unwrap();
    assert!(ec2.describe(std::slice::from_ref(&b.id)).await.unwrap()[0]
        .state
        .ended());
    // Twice, and an id EC2 never had: both Ok.
    ec2.terminate(&b.id).await.unwrap();
    ec2.terminate(&unknown).await.unwrap();
    assert_eq!(moto.instance(&b.id).unwrap().state, "terminated");
    assert_eq!(moto.instance(&a.id).unwrap().state, "running");

    // Stopping an instance that does not exist is an error with EC2's code.
    let err = ec2.stop(&unknown).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Permanent { code, .. } if code == "InvalidInstanceID.NotFound"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_listing_walks_every_page() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.addr());
    let ec2 = driver(&moto, &proxy.endpoint()).page_size(5);
    let mut want: Vec<String> = (0..12)
        .map(|_| moto.create_instance(&[(TAG_FLEET, "fleet-p")]))
        .collect();
    moto.create_instance(&[(TAG_FLEET, "fleet-q")]);
    let mut got: Vec<String> = ec2
        .list_by_tag(TAG_FLEET, "fleet-p")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(proxy.seen("DescribeInstances"), 3, "12 instances, 5 a page");
    // describe by ids pages the same way.
    assert_eq!(ec2.describe(&want).await.unwrap().len(), 12);
}

#[tokio::test]
async fn a_bad_image_is_permanent_with_ec2s_code() {
    let moto = Moto::start();
    let ec2 = driver(&moto, &moto.endpoint());
    let err = ec2
        .launch(&spec("launch-bad", "vm-1", "f", "ami-00000000deadbeef0"))
        .await
        .unwrap_err();
    match &err {
        ProviderError::Permanent { code, message } => {
            assert_eq!(code, "InvalidAMIID.NotFound");
            assert!(message.contains("ami-00000000deadbeef0"), "{message}");
        }
        other => panic!("want Permanent, got {other:?}"),
    }
    assert!(!err.retryable());
    assert!(moto.instances().is_empty());
}

#[tokio::test]
async fn injected_throttles_and_server_errors_are_retryable_and_nothing_retries_on_its_own() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.addr());
    let ec2 = driver(&moto, &proxy.endpoint());
    let image = moto.image();

    proxy.push("DescribeInstances", Fault::Throttle, 1);
    let err = ec2.describe(&["i-1".to_owned()]).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Throttled(m) if m.contains("RequestLimitExceeded")),
        "{err:?}"
    );
    // One request: the SDK's own retries are off.
    assert_eq!(proxy.seen("DescribeInstances"), 1);
    assert_eq!(ec2.describe(&["i-1".to_owned()]).await.unwrap(), Vec::new());

    proxy.push("RunInstances", Fault::ServerError, 2);
    for _ in 0..2 {
        let err = ec2
            .launch(&spec("launch-5xx", "vm-1", "f", &image))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProviderError::Transient(m) if m.contains("InternalError")),
            "{err:?}"
        );
    }
    assert!(
        moto.instances().is_empty(),
        "a 500 the proxy made never reached moto"
    );
    let ok = ec2
        .launch(&spec("launch-5xx", "vm-1", "f", &image))
        .await
        .unwrap();
    assert_eq!(proxy.seen("RunInstances"), 3);
    assert_eq!(moto.instances().len(), 1);

    proxy.push(
        "StartInstances",
        Fault::Permanent("UnauthorizedOperation".into()),
        1,
    );
    let err = ec2.start(&ok.id).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Permanent { code, .. } if code == "UnauthorizedOperation"),
        "{err:?}"
    );

    proxy.push("TerminateInstances", Fault::Throttle, 1);
    assert!(matches!(
        ec2.terminate(&ok.id).await,
        Err(ProviderError::Throttled(_))
    ));
    ec2.terminate(&ok.id).await.unwrap();
    assert_eq!(moto.instance(&ok.id).unwrap().state, "terminated");

    proxy.push("DescribeInstances", Fault::Throttle, 5);
    proxy.clear();
    assert_eq!(proxy.seen("DescribeInstances"), 0);
    ec2.list_by_tag(TAG_VM, "vm-1").await.unwrap();
}

#[tokio::test]
async fn a_lost_answer_is_transient_and_the_launch_tag_finds_the_instance() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.endpoint());
    let ec2 = driver(&moto, &proxy.endpoint());
    proxy.push("RunInstances", Fault::ForwardThenFail, 1);
    let s = spec("launch-lost-1", "vm-9", "fleet-a", &moto.image());
    let err = ec2.launch(&s).await.unwrap_err();
    assert!(err.retryable(), "{err:?}");
    // The call went through: exactly one instance carries the launch tag,
    // which is what the broker looks up before it retries.
    let found = ec2.list_by_tag(TAG_LAUNCH, "launch-lost-1").await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].tags.get(TAG_VM).map(String::as_str), Some("vm-9"));
}

#[tokio::test]
async fn a_call_that_gets_no_answer_times_out_as_transient() {
    // Accepts connections (the kernel does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let moto_less = format!("http://{}", silent.local_addr().unwrap());
    let settings = novacron_ec2::Settings {
        call_timeout: Duration::from_millis(300),
        ..moto::driver_settings(&moto_less)
    };
    let ec2 = Ec2::new(settings).unwrap();
    let err = ec2.list_by_tag(TAG_FLEET, "f").await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Transient(m) if m.contains("timed out")),
        "{err:?}"
    );
}

#[tokio::test]
async fn credentials_appear_in_no_debug_error_or_moto_log() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.addr());
    let settings = moto.settings(&proxy.endpoint());
    let ec2 = Ec2::new(settings.clone()).unwrap();
    proxy.push("RunInstances", Fault::Throttle, 1);
    proxy.push("RunInstances", Fault::ServerError, 1);
    let mut shown = vec![format!("{settings:?}"), format!("{ec2:?}")];
    for image in [moto.image(), moto.image(), "ami-0000000000000bad0".to_owned()] {
        let err = ec2
            .launch(&spec("launch-c", "vm-c", "f", &image))
            .await
            .unwrap_err();
        shown.push(format!("{err:?} / {err}"));
    }
    let ok = ec2
        .launch(&spec("launch-c", "vm-c", "f", &moto.image()))
        .await
        .unwrap();
    shown.push(format!("{ok:?}"));
    shown.push(moto.log());
    for s in &shown {
        assert!(!s.contains(SECRET_ACCESS_KEY), "the secret leaked: {s}");
    }
    assert!(
        shown[0].contains("<redacted>") && shown[1].contains("<redacted>"),
        "{shown:?}"
    );
}

#[tokio::test]
async fn standard_credentials_resolve_from_a_shared_credentials_file() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = wrong\n\n\
         [burst]\naws_access_key_id = AKIAFROMFILE\naws_secret_access_key = from-the-file\n",
    )
    .unwrap();
    let env = |k: &str| match k {
        "AWS_SHARED_CREDENTIALS_FILE" => Some(file.display().to_string()),
        "AWS_CONFIG_FILE" => Some(dir.path().join("config").display().to_string()),
        _ => None,
    };
    let read = |p: &std::path::Path| match std::fs::read_to_string(p) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    let source = CredentialSource::Standard {
        profile: Some("burst".into()),
    };
    let creds = credentials::resolve(&source, &env, &read).unwrap();
    assert_eq!(creds.access_key_id, "AKIAFROMFILE");
    assert_eq!(creds.secret_access_key, "from-the-file");
    // The keys work (moto accepts any): the driver makes a real call with them.
    let mut settings = moto.settings(&moto.endpoint());
    settings.credentials = source;
    let ec2 = Ec2::with_credentials(settings, creds).unwrap();
    assert!(ec2.list_by_tag(TAG_FLEET, "none").await.unwrap().is_empty());
    assert!(!format!("{ec2:?}").contains("from-the-file"));
}

/// Prints the RunInstances rate against moto (one line, for the report).
#[tokio::test]
#[allow(clippy::disallowed_methods)] // measuring a real server's throughput needs the OS clock
async fn launches_per_second_against_moto() {
    const N: usize = 40;
    let started = std::time::Instant::now();
    let moto = Moto::start();
    let ec2 = driver(&moto, &moto.endpoint());
    let image = moto.image();
    // One launch first: moto builds its EC2 backend on the first call.
    ec2.launch(&spec("warm", "vm-warm", "f", &image)).await.unwrap();
    let first = started.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..N {
        let id = format!("launch-{i}");
        ids.insert(
            ec2.launch(&spec(&id, &format!("vm-{i}"), "f", &image))
                .await
                .unwrap()
                .id,
        );
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ids.len(), N);
    assert_eq!(ec2.list_by_tag(TAG_FLEET, "f").await.unwrap().len(), N + 1);
    println!(
        "ec2: {N} sequential RunInstances against moto in {secs:.2} s: {:.1} launches/s \
         (moto start to first launch {first:.2} s)",
        N as f64 / secs
    );
}
