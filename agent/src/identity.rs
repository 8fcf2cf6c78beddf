//! The host's identity on disk: its key and certificate (one file, so a
//! renewal replaces both atomically), the fleet CA, and the enrollment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_shared::ids::HostId;
use novacron_shared::pki::{self, CertInfo, PkiError, Validity};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// Reading or writing the identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The host has not joined a fleet.
    #[error("this host has not joined a fleet ({0} is missing); run `novacron-agent join` first")]
    NotEnrolled(String),
    /// The host already joined.
    #[error("this host already joined a fleet ({0} exists); pass --force to join again")]
    AlreadyEnrolled(String),
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
    /// The stored material is unusable.
    #[error("stored key or certificate is unusable")]
    Pki(#[from] PkiError),
    /// The enrollment file is unreadable.
    #[error("enrollment file {path} is invalid: {message}")]
    Enrollment {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A renewed certificate does not fit this host.
    #[error("renewed certificate names host {got}, not {expected}")]
    WrongHost {
        /// Ours.
        expected: HostId,
        /// In the certificate.
        got: HostId,
    },
}

/// Where the agent enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The server's QUIC address.
    pub server: String,
    /// The name the server's certificate carries.
    pub server_name: String,
    /// This host's id.
    pub host_id: String,
}

/// The host's key, certificate and CA.
#[derive(Debug, Clone)]
pub struct Identity {
    /// This host's id (from the certificate).
    pub host_id: HostId,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The fleet CA, DER.
    pub ca_der: Vec<u8>,
    /// When the certificate is valid.
    pub validity: Validity,
}

/// The files in the agent's data directory.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// Paths under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// Certificate and key, PEM.
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity.pem")
    }
    /// The fleet CA, PEM.
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// Where the host enrolled.
    pub fn enrollment(&self) -> PathBuf {
        self.root.join("enrollment.toml")
    }
    /// The HA lease terms the server last sent (JSON), for the next start.
    pub fn lease_terms(&self) -> PathBuf {
        self.root.join("lease-terms.json")
    }
    /// The fence guard's socket.
    pub fn fence_guard(&self) -> PathBuf {
        self.root.join("fence-guard.sock")
    }
}

impl Identity {
    /// Builds an identity from a signed certificate and the key that made the CSR.
    pub fn new(cert_der: Vec<u8>, key_pem: String, ca_der: Vec<u8>) -> Result<Self, IdentityError> {
        let info = CertInfo::parse(&cert_der)?;
        Ok(Self {
            host_id: info.host_id()?,
            validity: info.validity(),
            cert_der,
            key_pem,
            ca_der,
        })
    }

    /// Loads the identity from the data directory.
    pub fn load(paths: &Paths) -> Result<Self, IdentityError> {
        let text = read(&paths.identity())?;
        let cert = pki::certs_from_pem(&text)?.remove(0);
        // Validate that the key parses; keep the PEM.
        pki::key_from_pem(&text)?;
        let key_pem = text
            .find("-----BEGIN PRIVATE KEY-----")
            .map(|i| text[i..].to_string())
            .ok_or(PkiError::Pem("private key"))?;
        let ca = pki::certs_from_pem(&read(&paths.ca())?)?.remove(0);
        Self::new(cert.to_vec(), key_pem, ca.to_vec())
    }

    /// Writes the identity (mode 0600, atomically).
    pub fn save(&self, paths: &Paths) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&paths.root).map_err(|source| io("create", &paths.root, source))?;
        write_private(&paths.ca(), pki::cert_to_pem(&self.ca_der).as_bytes())?;
        let bundle = format!("{}{}", pki::cert_to_pem(&self.cert_der), self.key_pem);
        write_private(&paths.identity(), bundle.as_bytes())
    }

    /// The QUIC client configuration presenting this identity.
    pub fn client_config(&self, idle_timeout: Duration) -> Result<quinn::ClientConfig, IdentityError> {
        let key = pki::key_from_pem(&self.key_pem)?;
        novacron_shared::tls::client_config_mtls(
            CertificateDer::from(self.ca_der.clone()),
            vec![CertificateDer::from(self.cert_der.clone())],
            key,
            idle_timeout,
        )
        .map_err(|e| IdentityError::Io {
            op: "use",
            path: format!("identity ({e})"),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// This identity with a renewed certificate and the key its CSR was made with.
    pub fn renewed(&self, cert_der: Vec<u8>, key_pem: String) -> Result<Self, IdentityError> {
        let next = Self::new(cert_der, key_pem, self.ca_der.clone())?;
        if next.host_id != self.host_id {
            return Err(IdentityError::WrongHost {
                expected: self.host_id,
                got: next.host_id,
            });
        }
        Ok(next)
    }
}

impl Enrollment {
    /// Loads the enrollment record.
    pub fn load(paths: &Paths) -> Result<Self, IdentityError> {
        let p = paths.enrollment();
        toml::from_str(&read(&p)?).map_err(|e| IdentityError::Enrollment {
            path: p.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Saves the enrollment record.
    pub fn save(&self, paths: &Paths) -> Result<(), IdentityError> {
        let text = toml::to_string(self).map_err(|e| IdentityError::Enrollment {
            path: paths.enrollment().display().to_string(),
            message: e.to_string(),
        })?;
        write_private(&paths.enrollment(), text.as_bytes())
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NotEnrolled(path.display().to_string())
        } else {
            io("read", path, source)
        }
    })
}

/// Writes a private file (0600, atomically), naming it in the error.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    novacron_shared::files::write_private(path, bytes).map_err(|source| io("write", path, source))
}
