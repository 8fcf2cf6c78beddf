//! The server's data directory: fleet CA, server certificate, database and
//! the first admin token, and `init`, which creates them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use novacron_shared::pki::{self, FleetCa, PkiError, Validity};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ServerConfig;
use crate::secrets;
use crate::store::{ApiTokenRecord, Role, Store, StoreError};

/// Lifetime of the fleet CA.
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Lifetime of the server's own certificate (renewed at two thirds of it,
/// see `crate::https`).
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);

/// Setting up or reading the data directory failed.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// `init` found an existing CA.
    #[error("a fleet CA already exists at {0}; refusing to overwrite it (agents trust it). Remove the data directory to start a new fleet")]
    AlreadyInitialised(String),
    /// The directory has not been initialised.
    #[error("{0} is missing; run `novacron-server init` first")]
    NotInitialised(String),
    /// A file could not be read or written.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Key or certificate material is unusable.
    #[error("PKI material in the data directory is unusable")]
    Pki(#[from] PkiError),
    /// The database failed.
    #[error("database failed")]
    Store(#[from] StoreError),
}

/// Paths inside the data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// What `init` made.
#[derive(Debug)]
pub struct InitReport {
    /// SHA-256 fingerprint of the fleet CA (agents pin it when joining).
    pub ca_fingerprint: String,
    /// The first admin API token (also in `admin.token`, mode 0600).
    pub admin_token: String,
}

/// The server's loaded key material.
#[derive(Debug)]
pub struct ServerPki {
    /// The fleet CA (it signs host certificates).
    pub ca: FleetCa,
    /// The server certificate followed by the CA certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The server's private key.
    pub key: PrivateKeyDer<'static>,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    fn server_cert(&self) -> PathBuf {
        self.root.join("server.pem")
    }
    fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    /// The redb database.
    pub fn db(&self) -> PathBuf {
        self.root.join("novacron.redb")
    }
    /// The metrics database (its own file: ingest never waits on the control plane's).
    pub fn metrics_db(&self) -> PathBuf {
        self.root.join("metrics.redb")
    }
    /// The first admin token, for the local CLI.
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    /// Creates the CA, the server certificate, the database and the first
    /// admin token. Refuses to touch an existing CA.
    pub fn init(&self, cfg: &ServerConfig, now: SystemTime) -> Result<InitReport, DataDirError> {
        if self.ca_cert().exists() {
            return Err(DataDirError::AlreadyInitialised(
                self.ca_cert().display().to_string(),
            ));
        }
        std::fs::create_dir_all(&self.root).map_err(|source| io("create", &self.root, source))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| io("chmod", &self.root, source))?;
        let (ca, ca_pem) = FleetCa::generate("NovaCron fleet CA", now, CA_TTL)?;
        // Key before certificate: a crash in between leaves no CA, so init can run again.
        write_private(&self.ca_key(), ca_pem.key_pem.as_bytes())?;
        self.issue_server_cert(&ca, &cfg.quic.server_names, now)?;
        let store = Store::open(&self.db())?;
        let admin_token = secrets::new_token("nca");
        store.put_api_token(
            &secrets::hash(&admin_token),
            &ApiTokenRecord {
                name: "admin (created by init)".into(),
                role: Role::Admin,
                created_ms: crate::unix_ms(now),
            },
        )?;
        write_private(&self.admin_token(), format!("{admin_token}\n").as_bytes())?;
        write_private(&self.ca_cert(), ca_pem.cert_pem.as_bytes())?;
        Ok(InitReport {
            ca_fingerprint: ca.fingerprint(),
            admin_token,
        })
    }

    /// Loads the CA and the server's certificate and key.
    pub fn load_pki(&self) -> Result<ServerPki, DataDirError> {
        let ca_pem = read(&self.ca_cert())?;
        let ca = FleetCa::from_pem(&ca_pem, &read(&self.ca_key())?)?;
        let chain = pki::certs_from_pem(&read(&self.server_cert())?)?;
        let key = pki::key_from_pem(&read(&self.server_key())?)?;
        Ok(ServerPki { ca, chain, key })
    }

    /// Loads the fleet CA alone (certificate and signing key).
    pub fn load_ca(&self) -> Result<FleetCa, DataDirError> {
        Ok(FleetCa::from_pem(
            &read(&self.ca_cert())?,
            &read(&self.ca_key())?,
        )?)
    }

    /// Issues a new server certificate from `ca` for `names`, valid from
    /// `now` for [`SERVER_CERT_TTL`], and writes it (key first, each file
    /// replaced atomically; a crash between the two leaves a key that does
    /// not match the certificate, which the server notices at start and
    /// mends by issuing again). Returns the chain (leaf, CA) and the key.
    pub fn issue_server_cert(
        &self,
        ca: &FleetCa,
        names: &[String],
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), DataDirError> {
        let server = ca.issue_server(names, Validity::for_ttl(now, SERVER_CERT_TTL))?;
        let ca_pem = pki::cert_to_pem(ca.cert_der());
        let chain_pem = format!("{}{}", server.cert_pem, ca_pem);
        write_private(&self.server_key(), server.key_pem.as_bytes())?;
        write_private(&self.server_cert(), chain_pem.as_bytes())?;
        Ok((
            pki::certs_from_pem(&chain_pem)?,
            pki::key_from_pem(&server.key_pem)?,
        ))
    }

    /// The CA's fingerprint, read from disk.
    pub fn ca_fingerprint(&self) -> Result<String, DataDirError> {
        let certs = pki::certs_from_pem(&read(&self.ca_cert())?)?;
        Ok(pki::fingerprint(&certs[0]))
    }

    /// The admin token the local CLI uses.
    pub fn read_admin_token(&self) -> Result<String, DataDirError> {
        Ok(read(&self.admin_token())?.trim().to_string())
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> DataDirError {
    DataDirError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn read(path: &Path) -> Result<String, DataDirError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataDirError::NotInitialised(path.display().to_string())
        } else {
            io("read", path, source)
        }
    })
}

/// Writes a private file (0600, atomically), naming it in the error.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    novacron_shared::files::write_private(path, bytes).map_err(|source| io("write", path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_everything_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dd = DataDir::new(dir.path().join("data"));
        let cfg = ServerConfig::default();
        let report = dd
            .init(&cfg, novacron_shared::clock::Clock::system().wall())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dd.ca_fingerprint().ok(), Some(report.ca_fingerprint.clone()));
        assert_eq!(dd.read_admin_token().ok(), Some(report.admin_token));
        let mode = std::fs::metadata(dd.ca_cert())
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        let pki = dd.load_pki().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pki.chain.len(), 2);
        let again = dd
            .init(&cfg, novacron_shared::clock::Clock::system().wall())
            .unwrap_err();
        assert!(matches!(again, DataDirError::AlreadyInitialised(_)), "{again}");
        assert_eq!(dd.ca_fingerprint().ok(), Some(report.ca_fingerprint));
    }
}
