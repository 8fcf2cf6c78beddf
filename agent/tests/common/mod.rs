//! What the agent's test-driver tests share: a private test-driver host.

use novacron_agent::vmops::HostSetup;
use virt::connect::Connect;

/// A test-driver host with its own state and a scratch directory.
pub struct Host {
    /// The connection.
    pub conn: Connect,
    /// Pool and console paths inside the scratch directory.
    pub setup: HostSetup,
    _dir: tempfile::TempDir,
}

/// A private test-driver host (test:///default is shared by every
/// connection in a process; a node file gives each test its own state),
/// with `domains` (domain XML NovaCron did not define) in its node file.
pub fn host(domains: &str) -> Host {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>8</active><total>8</total>\
             <nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>\
             <memory>16777216</memory>{domains}</node>"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let uri = format!("test://{}", node.display());
    let conn = Connect::open(Some(&uri)).unwrap_or_else(|e| panic!("{e}"));
    let setup = HostSetup {
        pool: "novacron".into(),
        pool_path: dir.path().join("pool").to_string_lossy().into_owned(),
        console_dir: dir.path().to_string_lossy().into_owned(),
        virt_type: None,
        migration_uri: None,
        labels: Default::default(),
    };
    Host {
        conn,
        setup,
        _dir: dir,
    }
}
