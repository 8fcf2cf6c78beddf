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

/// libxml2 loads the RNG schema's datatype library lazily, and two
/// threads doing it at once can fail ("Error type 'unsignedInt' is not
/// exported by type library ..."). The test driver validates in this
/// process, and tests run on parallel threads, so the first validating
/// define runs here, once, before any test's own. (The agent defines on
/// its one hypervisor thread, and a real libvirtd validates in its own
/// process, so this is a test-harness concern only.)
fn load_domain_schema_once(conn: &Connect) {
    static SCHEMA: std::sync::Once = std::sync::Once::new();
    SCHEMA.call_once(|| {
        let xml = "<domain type='test'><name>schema-warm-up</name><memory>65536</memory>\
                   <os><type>hvm</type></os></domain>";
        let dom = conn
            .define_domain_xml_flags(xml, virt::sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .unwrap_or_else(|e| panic!("a validating define of a minimal domain failed: {e}"));
        dom.undefine().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// The URI of a private test-driver host (test:///default is shared by
/// every connection in a process; a node file gives each its own state),
/// with `domains` (domain XML NovaCron did not define) in its node file
/// under `dir`.
pub fn node_uri(dir: &std::path::Path, domains: &str) -> String {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>8</active><total>8</total>\
             <nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>\
             <memory>16777216</memory>{domains}</node>"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    format!("test://{}", node.display())
}

/// Pool and console paths inside `dir`.
pub fn setup_in(dir: &std::path::Path) -> HostSetup {
    HostSetup {
        pool: "novacron".into(),
        pool_path: dir.join("pool").to_string_lossy().into_owned(),
        console_dir: dir.to_string_lossy().into_owned(),
        virt_type: None,
        migration_uri: None,
        labels: Default::default(),
        host_name: "test-host".into(),
        disk_locks: false,
    }
}

/// A private test-driver host with `domains` in its node file.
pub fn host(domains: &str) -> Host {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let uri = node_uri(dir.path(), domains);
    let conn = Connect::open(Some(&uri)).unwrap_or_else(|e| panic!("{e}"));
    load_domain_schema_once(&conn);
    let setup = setup_in(dir.path());
    Host {
        conn,
        setup,
        _dir: dir,
    }
}

/// Warms the schema loader up on a connection of its own (see
/// [`host`]), for tests that drive the host through the agent's driver.
pub fn warm_up_schema() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let conn = Connect::open(Some(&node_uri(dir.path(), ""))).unwrap_or_else(|e| panic!("{e}"));
    load_domain_schema_once(&conn);
}
