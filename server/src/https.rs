//! HTTPS for the web API, and the server certificate kept fresh.
//!
//! By default the API serves the server certificate that the fleet CA
//! issued, the same one the QUIC endpoint presents to agents. Both
//! listeners read it from one [`ReloadableCert`], so a renewal reaches
//! both from the next handshake on, without a restart. The certificate is
//! renewed at two thirds of its lifetime (and at start when it is already
//! past that point, or when its key does not match it after an interrupted
//! renewal). An operator may give the API another certificate
//! (`[api] cert_file`, `key_file`): the API then serves that one, re-read
//! when either file changes, while the fleet certificate keeps renewing for
//! QUIC.
//!
//! Owns: the server certificate's lifecycle and the API's TLS acceptor.
//! Does not touch: the store, sessions, or the host certificates agents renew.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use novacron_shared::clock::Clock;
use novacron_shared::pki::{self, CertInfo, FleetCa};
use novacron_shared::tls::{ReloadableCert, TlsError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ServerConfig;
use crate::datadir::{DataDir, DataDirError};

/// How often the renewer looks at the certificates.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Setting up HTTPS or renewing a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The data directory's CA or certificate could not be read or written.
    #[error("server certificate")]
    DataDir(#[from] DataDirError),
    /// An operator-given certificate or key file is unusable.
    #[error("cannot use {path}")]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// rustls refused the certificate and key.
    #[error("TLS refused the certificate")]
    Tls(#[from] TlsError),
    /// The certificate could not be parsed.
    #[error("the server certificate cannot be parsed")]
    Parse(#[from] pki::PkiError),
}

/// What a check decided (pure: certificate validity and `now` in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Nothing to do until the given time.
    NotYet(SystemTime),
    /// Renew now.
    Due,
}

/// Whether a certificate valid from `not_before` to `not_after` (Unix
/// seconds) should be renewed at `now`: from two thirds of its lifetime on.
pub fn renewal(info: &CertInfo, now: SystemTime) -> Renewal {
    let at = info.validity().renew_at();
    if now >= at {
        Renewal::Due
    } else {
        Renewal::NotYet(at)
    }
}

/// The server's certificates for both listeners.
#[derive(Debug, Clone)]
pub struct ServerCerts {
    /// The fleet CA's certificate for this server (QUIC, and the API by default).
    pub fleet: Arc<ReloadableCert>,
    /// What the API serves (the fleet certificate, or the operator's).
    pub api: Arc<ReloadableCert>,
}

/// Keeps the server certificates fresh: renews the fleet certificate at two
/// thirds of its life and reloads the operator's API certificate when its
/// files change. Driven by [`Renewer::check`] (tests call it with a manual
/// clock) or [`Renewer::run`].
#[derive(Debug)]
pub struct Renewer {
    dir: DataDir,
    ca: FleetCa,
    names: Vec<String>,
    clock: Clock,
    certs: ServerCerts,
    fleet_info: CertInfo,
    api_files: Option<ApiFiles>,
}

#[derive(Debug)]
struct ApiFiles {
    cert: PathBuf,
    key: PathBuf,
    seen: (Option<SystemTime>, Option<SystemTime>),
}

/// What one check did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checked {
    /// The serial of a newly issued fleet server certificate.
    pub renewed: Option<String>,
    /// The operator's API certificate was reloaded.
    pub reloaded_api: bool,
}

impl Renewer {
    /// Loads the CA and the server certificate (mending or renewing it at
    /// once if it is past due or its key does not match), and the
    /// operator's API certificate if configured.
    pub fn open(cfg: &ServerConfig, clock: Clock) -> Result<Self, HttpsError> {
        let dir = DataDir::new(&cfg.data_dir);
        let pki = dir.load_pki()?;
        let ca = pki.ca;
        let names = cfg.quic.server_names.clone();
        let now = clock.wall();
        let loaded = CertInfo::parse(&pki.chain[0])
            .map_err(HttpsError::from)
            .and_then(|info| Ok((ReloadableCert::new(pki.chain, pki.key)?, info)));
        let (fleet, fleet_info) = match loaded {
            Ok((cert, info)) if renewal(&info, now) != Renewal::Due => (cert, info),
            Ok(_) => {
                tracing::info!("the server certificate is past two thirds of its life; renewing it now");
                issue(&dir, &ca, &names, now)?
            }
            Err(HttpsError::Tls(e)) => {
                tracing::warn!(error = %e, "the server certificate and key do not fit together (an interrupted renewal?); issuing a new one");
                issue(&dir, &ca, &names, now)?
            }
            Err(e) => return Err(e),
        };
        let (api, api_files) = match (&cfg.api.cert_file, &cfg.api.key_file) {
            (Some(c), Some(k)) => {
                let files = ApiFiles {
                    cert: c.clone(),
                    key: k.clone(),
                    seen: (mtime(c), mtime(k)),
                };
                let (chain, key) = read_pair(c, k)?;
                (ReloadableCert::new(chain, key)?, Some(files))
            }
            _ => (fleet.clone(), None),
        };
        crate::telemetry::set_cert("server", &fleet_info);
        match CertInfo::parse(ca.cert_der()) {
            Ok(info) => crate::telemetry::set_cert("ca", &info),
            Err(e) => tracing::warn!(error = %e, "cannot read the fleet CA's validity for the metrics"),
        }
        Ok(Self {
            dir,
            ca,
            names,
            clock,
            certs: ServerCerts { fleet, api },
            fleet_info,
            api_files,
        })
    }

    /// The certificates the listeners serve.
    pub fn certs(&self) -> ServerCerts {
        self.certs.clone()
    }

    /// The fleet server certificate served now.
    pub fn fleet_info(&self) -> &CertInfo {
        &self.fleet_info
    }

    /// Renews the fleet certificate if due and reloads the operator's API
    /// certificate if its files changed. A failure leaves the current
    /// certificates serving.
    pub fn check(&mut self) -> Result<Checked, HttpsError> {
        let mut out = Checked::default();
        if renewal(&self.fleet_info, self.clock.wall()) == Renewal::Due {
            let (chain, key, info) = issue_parts(&self.dir, &self.ca, &self.names, self.clock.wall())?;
            self.certs.fleet.replace(chain, key)?;
            tracing::info!(serial = %info.serial, not_after = info.not_after, "server certificate renewed");
            out.renewed = Some(info.serial.clone());
            crate::telemetry::set_cert("server", &info);
            self.fleet_info = info;
        }
        if let Some(f) = &mut self.api_files {
            let now_seen = (mtime(&f.cert), mtime(&f.key));
            if now_seen != f.seen {
                let (chain, key) = read_pair(&f.cert, &f.key)?;
                self.certs.api.replace(chain, key)?;
                f.seen = now_seen;
                tracing::info!(cert = %f.cert.display(), "API certificate reloaded");
                out.reloaded_api = true;
            }
        }
        Ok(out)
    }

    /// Checks every [`CHECK_EVERY`] until the task is dropped; failures are
    /// logged and retried at the next check.
    pub async fn run(mut self) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if let Err(e) = self.check() {
                tracing::error!(error = ?e, "server certificate check failed; the current certificate keeps serving");
            }
        }
    }
}

/// A new server certificate, written to the data directory: chain, key
/// and what it says.
fn issue_parts(
    dir: &DataDir,
    ca: &FleetCa,
    names: &[String],
    now: SystemTime,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, CertInfo), HttpsError> {
    let (chain, key) = dir.issue_server_cert(ca, names, now)?;
    let info = CertInfo::parse(&chain[0])?;
    Ok((chain, key, info))
}

/// [`issue_parts`], served from a new [`ReloadableCert`].
fn issue(
    dir: &DataDir,
    ca: &FleetCa,
    names: &[String],
    now: SystemTime,
) -> Result<(Arc<ReloadableCert>, CertInfo), HttpsError> {
    let (chain, key, info) = issue_parts(dir, ca, names, now)?;
    Ok((ReloadableCert::new(chain, key)?, info))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), HttpsError> {
    let file_err = |p: &Path, e: Box<dyn std::error::Error + Send + Sync>| HttpsError::File {
        path: p.display().to_string(),
        source: e,
    };
    let c = std::fs::read_to_string(cert).map_err(|e| file_err(cert, e.into()))?;
    let k = std::fs::read_to_string(key).map_err(|e| file_err(key, e.into()))?;
    let chain = pki::certs_from_pem(&c).map_err(|e| file_err(cert, e.into()))?;
    let key_der = pki::key_from_pem(&k).map_err(|e| file_err(key, e.into()))?;
    Ok((chain, key_der))
}

/// The API's TLS acceptor over `cert`.
pub fn acceptor(cert: Arc<ReloadableCert>) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(
        novacron_shared::tls::https_server_config(cert)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::clock::ManualClock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(dir: &Path) -> ServerConfig {
        ServerConfig {
            data_dir: dir.join("data"),
            ..ServerConfig::default()
        }
    }

    /// A data directory initialised `days_ago` days before the real now, with
    /// a manual clock standing at that moment.
    fn init_in_the_past(days_ago: u64) -> (tempfile::TempDir, ServerConfig, Clock, Arc<ManualClock>) {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let start = Clock::system().wall() - Duration::from_secs(days_ago * 86_400);
        let m = Arc::new(ManualClock::starting_at(start));
        let clock = Clock::from_source(m.clone());
        DataDir::new(&cfg.data_dir).init(&cfg, clock.wall()).unwrap();
        (tmp, cfg, clock, m)
    }

    /// A real TLS handshake against `acceptor` on loopback, trusting `ca`;
    /// returns the serial of the certificate the server presented.
    async fn served_serial(acceptor: tokio_rustls::TlsAcceptor, ca: CertificateDer<'static>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.unwrap();
            tls.write_all(b"pong").await.unwrap();
            tls.shutdown().await.ok();
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let client_cfg =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        server.await.unwrap();
        CertInfo::parse(&leaf).unwrap().serial
    }

    #[test]
    fn renewal_is_due_from_two_thirds_of_the_lifetime() {
        let info = CertInfo {
            serial: "1".into(),
            common_name: "novacron-server".into(),
            not_before: 0,
            not_after: 300,
        };
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(renewal(&info, at(199)), Renewal::NotYet(at(200)));
        assert_eq!(renewal(&info, at(200)), Renewal::Due);
        assert_eq!(renewal(&info, at(400)), Renewal::Due);
    }

    #[tokio::test]
    async fn the_fleet_certificate_renews_without_a_restart() {
        // Issued 300 days ago for a year: renewal was due at day 243.
        let (_tmp, cfg, clock, manual) = init_in_the_past(300);
        let mut r = Renewer::open(&cfg, clock).unwrap();
        let first = r.fleet_info().serial.clone();
        let acceptor = acceptor(r.certs().api).unwrap();
        let ca = DataDir::new(&cfg.data_dir).load_ca().unwrap().cert_der().clone();
        assert_eq!(served_serial(acceptor.clone(), ca.clone()).await, first);
        assert_eq!(r.check().unwrap(), Checked::default(), "not due on day 0");
        manual.advance(Duration::from_secs(299 * 86_400));
        let checked = r.check().unwrap();
        let renewed = checked.renewed.expect("renewed on day 299");
        assert_ne!(renewed, first);
        // The same acceptor (no restart) now presents the new certificate,
        // and so does the QUIC side (one ReloadableCert for both).
        assert_eq!(served_serial(acceptor, ca.clone()).await, renewed);
        assert_eq!(CertInfo::parse(&r.certs().fleet.leaf()).unwrap().serial, renewed);
        // It was written to disk: a restart serves it too, and does not renew again.
        let again = Renewer::open(&cfg, Clock::from_source(manual.clone())).unwrap();
        assert_eq!(again.fleet_info().serial, renewed);
        assert_eq!(r.check().unwrap(), Checked::default(), "renewed once only");
    }

    #[test]
    fn a_certificate_past_due_at_start_is_renewed_at_once() {
        let (_tmp, cfg, clock, manual) = init_in_the_past(300);
        let first = Renewer::open(&cfg, clock).unwrap().fleet_info().serial.clone();
        manual.advance(Duration::from_secs(250 * 86_400));
        let r = Renewer::open(&cfg, Clock::from_source(manual)).unwrap();
        assert_ne!(r.fleet_info().serial, first);
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_mended_at_start() {
        let (_tmp, cfg, clock, _m) = init_in_the_past(1);
        let first = Renewer::open(&cfg, clock.clone())
            .unwrap()
            .fleet_info()
            .serial
            .clone();
        // An interrupted renewal: a new key was written, the old certificate stayed.
        let other = DataDir::new(cfg.data_dir.join("other"));
        other.init(&cfg, clock.wall()).unwrap();
        std::fs::copy(
            cfg.data_dir.join("other/server.key"),
            cfg.data_dir.join("server.key"),
        )
        .unwrap();
        let r = Renewer::open(&cfg, clock).unwrap();
        assert_ne!(r.fleet_info().serial, first);
    }

    #[tokio::test]
    async fn the_operators_api_certificate_is_served_and_reloaded() {
        let (tmp, mut cfg, clock, _m) = init_in_the_past(1);
        // The operator's own CA and certificate for the API, valid now (the
        // TLS client checks validity against the real time).
        let real_now = Clock::system().wall();
        let (op_ca, op_pem) =
            FleetCa::generate("operator CA", real_now, Duration::from_secs(86_400)).unwrap();
        let write = |n: u32| {
            let c = op_ca
                .issue_server(
                    &["localhost".to_string()],
                    pki::Validity::for_ttl(real_now, Duration::from_secs(3600 * u64::from(n))),
                )
                .unwrap();
            std::fs::write(tmp.path().join("api.pem"), c.cert_pem).unwrap();
            std::fs::write(tmp.path().join("api.key"), c.key_pem).unwrap();
        };
        write(1);
        cfg.api.cert_file = Some(tmp.path().join("api.pem"));
        cfg.api.key_file = Some(tmp.path().join("api.key"));
        let mut r = Renewer::open(&cfg, clock.clone()).unwrap();
        let op_ca_der = pki::certs_from_pem(&op_pem.cert_pem).unwrap().remove(0);
        let acc = acceptor(r.certs().api).unwrap();
        let s1 = served_serial(acc.clone(), op_ca_der.clone()).await;
        assert_ne!(
            s1,
            r.fleet_info().serial,
            "the API serves the operator's certificate"
        );
        // A new file (mtime moves on) is picked up by the next check.
        let t = std::fs::metadata(tmp.path().join("api.pem"))
            .unwrap()
            .modified()
            .unwrap();
        write(2);
        let f = std::fs::File::options()
            .write(true)
            .open(tmp.path().join("api.pem"))
            .unwrap();
        f.set_modified(t + Duration::from_secs(5)).unwrap();
        assert!(r.check().unwrap().reloaded_api);
        let s2 = served_serial(acc, op_ca_der).await;
        assert_ne!(s1, s2);
    }
}
