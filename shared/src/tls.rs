//! QUIC and TLS configuration for both ends of the link, and for the peer
//! witness between agents.
//!
//! Only TLS 1.3 with the ring provider, ALPN `novacron/1`. The server accepts
//! clients with no certificate only so that they can enroll; the session
//! layer refuses anything but a join from them. The peer witness
//! ([`witness_server_config`], [`witness_client_config`]; ALPN
//! [`crate::witness::ALPN`]) is mutual TLS both ways against the fleet CA:
//! no certificate, no answer.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::pki::fingerprint;
use crate::ALPN;

/// Building a TLS or QUIC configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificates, key or settings.
    #[error("TLS configuration rejected")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("client verifier could not be built from the CA")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the TLS configuration.
    #[error("QUIC crypto configuration rejected")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Idle timeout and keep-alive settings for a NovaCron connection.
pub fn transport(idle_timeout: Duration, keep_alive: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(keep_alive);
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(16u32.into());
    // A control stream carries small frames; metrics ride on their own
    // streams. Modest windows keep per-connection memory low at fleet scale.
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((4u32 << 20).into());
    t.send_window(4 << 20);
    Arc::new(t)
}

/// The server's QUIC config: presents `chain` (server certificate then CA),
/// verifies client certificates against `ca` when one is offered.
pub fn server_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_reloadable(ca, ReloadableCert::new(chain, key)?, idle_timeout)
}

/// Like [`server_config`], presenting whatever certificate `cert` holds at
/// each handshake, so a renewed certificate is served without a restart.
pub fn server_config_reloadable(
    ca: CertificateDer<'static>,
    cert: Arc<ReloadableCert>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout, None));
    Ok(cfg)
}

/// The web API's TLS config (HTTPS, HTTP/1.1, TLS 1.2 and 1.3, no client
/// certificates: callers carry bearer tokens), presenting `cert`.
pub fn https_server_config(cert: Arc<ReloadableCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A server certificate that can be replaced while serving: every new
/// handshake gets the current one (renewal without a restart).
pub struct ReloadableCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl std::fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableCert").finish_non_exhaustive()
    }
}

impl ReloadableCert {
    /// Holds `chain` (leaf first) and its `key`; refuses a key that does
    /// not match the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(Arc::new(certified(chain, key)?)),
        }))
    }

    /// Serves `chain` and `key` from the next handshake on; on error the
    /// current certificate stays.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let next = Arc::new(certified(chain, key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// The leaf certificate served now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        let cur = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        cur.cert[0].clone()
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::Rustls(rustls::Error::NoCertificatesPresented));
    }
    Ok(rustls::sign::CertifiedKey::from_der(chain, key, &provider())?)
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// As a client certificate (the peer witness): the current one, whatever
/// the server asks for.
impl rustls::client::ResolvesClientCert for ReloadableCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// An agent's peer-witness endpoint: presents whatever host certificate
/// `cert` holds (renewals apply from the next handshake) and accepts only
/// clients with a certificate the fleet CA `ca` signed; ALPN
/// [`crate::witness::ALPN`].
pub fn witness_server_config(
    ca: CertificateDer<'static>,
    cert: Arc<ReloadableCert>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![crate::witness::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout, None));
    Ok(cfg)
}

/// An agent asking its peers: verifies the answering host's certificate
/// against the fleet CA `ca` with standard server verification (the name
/// dialled is the peer's host id, which its certificate carries as a DNS
/// name), and presents the host certificate `cert` holds; ALPN
/// [`crate::witness::ALPN`].
pub fn witness_client_config(
    ca: CertificateDer<'static>,
    cert: Arc<ReloadableCert>,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(cert);
    tls.alpn_protocols = vec![crate::witness::ALPN.to_vec()];
    finish_client(tls, idle_timeout)
}

/// An enrolled agent's config: trusts only the fleet CA, presents its own
/// certificate.
pub fn client_config_mtls(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    finish_client(tls, idle_timeout)
}

/// A joining agent's config: no client certificate; the server must present
/// a chain that contains the CA whose SHA-256 fingerprint is `ca_fingerprint`
/// and a server certificate that CA signed for the name we dial.
pub fn client_config_pinned(
    ca_fingerprint: &str,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_string(),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    finish_client(tls, idle_timeout)
}

fn finish_client(tls: rustls::ClientConfig, idle_timeout: Duration) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(idle_timeout, Some(idle_timeout / 3)));
    Ok(cfg)
}

/// Verifies the server against a CA identified only by its fingerprint (the
/// join step, before the agent has the CA certificate itself).
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA does not match the pinned fingerprint {}; \
                     check --ca-fingerprint against `novacron-server ca fingerprint`",
                    self.fingerprint
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The peer's leaf certificate on an established connection, if it sent one.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}
