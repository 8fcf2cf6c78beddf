//! The fleet PKI: CA, server and host certificates, CSRs, fingerprints.
//!
//! The CA lives on the server. Hosts make their keys locally and send only a
//! CSR; the server ignores whatever subject the CSR asks for and writes the
//! host id it assigned into the certificate's common name.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ids::HostId;

/// A PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating a key or certificate failed.
    #[error("could not generate {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// The CSR did not parse or its signature did not verify.
    #[error("the certificate signing request is invalid")]
    Csr(#[source] rcgen::Error),
    /// A certificate did not parse.
    #[error("the certificate is not valid X.509 DER")]
    Certificate,
    /// A PEM file held nothing usable.
    #[error("no {0} found in PEM data")]
    Pem(&'static str),
    /// A fingerprint string is not 32 bytes of hex.
    #[error("invalid CA fingerprint {0:?}: expected 64 hex digits (colons and a sha256: prefix are fine)")]
    Fingerprint(String),
    /// A certificate's common name is not a host id.
    #[error("the certificate's common name {0:?} is not a host id")]
    NotAHost(String),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: SystemTime,
    /// Not valid after.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from a little before `now` (for clock skew: a tenth of the TTL,
    /// at most five minutes) until `now + ttl`.
    pub fn for_ttl(now: SystemTime, ttl: Duration) -> Self {
        let skew = (ttl / 10).min(Duration::from_secs(300));
        Self {
            not_before: now.checked_sub(skew).unwrap_or(now),
            not_after: now + ttl,
        }
    }

    /// The moment two thirds of the lifetime have passed: renew from here on.
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life.mul_f64(2.0 / 3.0)
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x10; // no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&bytes)
}

/// The fleet certificate authority.
pub struct FleetCa {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa")
            .field("fingerprint", &fingerprint(&self.cert_der))
            .finish_non_exhaustive()
    }
}

/// A certificate with its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertAndKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
}

impl FleetCa {
    /// Makes a new CA valid for `ttl`.
    pub fn generate(name: &str, now: SystemTime, ttl: Duration) -> Result<(Self, CertAndKey), PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "CA key",
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "NovaCron");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let v = Validity::for_ttl(now, ttl);
        params.not_before = to_offset(v.not_before);
        params.not_after = to_offset(v.not_after);
        let cert = params.self_signed(&key).map_err(|source| PkiError::Generate {
            what: "CA certificate",
            source,
        })?;
        let pair = CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok((
            Self {
                cert_der: cert.der().clone(),
                issuer: Issuer::new(params, key),
            },
            pair,
        ))
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| PkiError::Pem("certificate"))?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::Pem("private key"))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|_| PkiError::Certificate)?;
        Ok(Self { cert_der, issuer })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's SHA-256 fingerprint, as agents pin it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Issues the server's own certificate for the given DNS names and IPs.
    pub fn issue_server(&self, names: &[String], validity: Validity) -> Result<CertAndKey, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "server key",
            source,
        })?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|source| PkiError::Generate {
            what: "server certificate names",
            source,
        })?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "novacron-server");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(validity.not_before);
        params.not_after = to_offset(validity.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "server certificate",
                source,
            })?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a host's CSR. Only the CSR's public key is used: the subject is
    /// replaced by the host id, the one DNS name is the host id, and the
    /// usage is fixed to client auth (the link to the server) and server
    /// auth (the peer witness, where other hosts verify "this is host X"
    /// with standard server verification against the fleet CA).
    pub fn sign_host_csr(
        &self,
        csr_der: &[u8],
        host_id: HostId,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into()).map_err(PkiError::Csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host_id.to_string());
        dn.push(DnType::OrganizationName, "NovaCron hosts");
        params.distinguished_name = dn;
        let name = host_id
            .to_string()
            .try_into()
            .map_err(|source| PkiError::Generate {
                what: "host certificate name",
                source,
            })?;
        params.subject_alt_names = vec![SanType::DnsName(name)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(validity.not_before);
        params.not_after = to_offset(validity.not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "host certificate",
                source,
            })?;
        Ok(cert.der().clone())
    }
}

/// Makes a fresh host key and a CSR for it. The key never leaves the host.
pub fn make_csr(hostname: &str) -> Result<(KeyPair, Vec<u8>), PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "host key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hostname);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|source| PkiError::Generate { what: "CSR", source })?;
    Ok((key, csr.der().to_vec()))
}

/// The SHA-256 fingerprint of a DER certificate, as 64 lowercase hex digits.
pub fn fingerprint(der: &[u8]) -> String {
    sha256_hex(der)
}

/// SHA-256 of any bytes, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalises a fingerprint written by a person (`sha256:`, colons, case).
pub fn parse_fingerprint(s: &str) -> Result<String, PkiError> {
    let t = s.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(PkiError::Fingerprint(s.chars().take(100).collect()))
    }
}

/// What NovaCron needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Subject common name.
    pub common_name: String,
    /// Not valid before (Unix seconds).
    pub not_before: i64,
    /// Not valid after (Unix seconds).
    pub not_after: i64,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| PkiError::Certificate)?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            serial: cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
            common_name,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// The host id in the common name.
    pub fn host_id(&self) -> Result<HostId, PkiError> {
        self.common_name
            .parse()
            .map_err(|_| PkiError::NotAHost(self.common_name.chars().take(80).collect()))
    }

    /// The validity window.
    pub fn validity(&self) -> Validity {
        let at = |s: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0));
        Validity {
            not_before: at(self.not_before),
            not_after: at(self.not_after),
        }
    }
}

/// All certificates in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::Pem("certificate"))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("certificate"));
    }
    Ok(certs)
}

/// The private key in a PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Pem("private key"))
}

/// PEM-encodes one DER certificate.
pub fn cert_to_pem(der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (FleetCa, CertAndKey) {
        FleetCa::generate(
            "test CA",
            crate::clock::Clock::system().wall(),
            Duration::from_secs(3600),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn csr_is_signed_with_host_id_not_requested_subject() {
        let (ca, _) = ca();
        let (_key, csr) = make_csr("evil-host; CN=admin").unwrap_or_else(|e| panic!("{e}"));
        let id = HostId(42);
        let der = ca
            .sign_host_csr(
                &csr,
                id,
                Validity::for_ttl(crate::clock::Clock::system().wall(), Duration::from_secs(60)),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let info = CertInfo::parse(&der).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.host_id().ok(), Some(id));
        assert_eq!(info.not_after - info.not_before, 66);
    }

    #[test]
    fn a_host_certificate_serves_as_that_host_to_its_peers() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{ServerName, UnixTime};
        let (ca, _) = ca();
        let (_key, csr) = make_csr("h1").unwrap_or_else(|e| panic!("{e}"));
        let id = HostId(0x2a);
        let now = crate::clock::Clock::system().wall();
        let der = ca
            .sign_host_csr(&csr, id, Validity::for_ttl(now, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap_or_else(|e| panic!("{e}"));
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let name = |s: &str| ServerName::try_from(s.to_string()).unwrap_or_else(|e| panic!("{s}: {e}"));
        // Server auth for its own id (a DNS name), not for another host's.
        verifier
            .verify_server_cert(&der, &[], &name(&id.to_string()), &[], at)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(verifier
            .verify_server_cert(&der, &[], &name(&HostId(0x2b).to_string()), &[], at)
            .is_err());
        // And still a client certificate: both usages, one DNS name.
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap_or_else(|e| panic!("{e}"));
        let eku = cert
            .extended_key_usage()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no EKU"))
            .value;
        assert!(eku.client_auth && eku.server_auth, "{eku:?}");
        let san = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no SAN"))
            .value;
        assert_eq!(
            san.general_names,
            vec![x509_parser::extensions::GeneralName::DNSName(&id.to_string())]
        );
    }

    #[test]
    fn garbage_csr_is_refused() {
        let (ca, _) = ca();
        let v = Validity::for_ttl(crate::clock::Clock::system().wall(), Duration::from_secs(60));
        assert!(matches!(
            ca.sign_host_csr(b"not a csr", HostId(1), v),
            Err(PkiError::Csr(_))
        ));
    }

    #[test]
    fn ca_reloads_from_pem_and_keeps_fingerprint() {
        let (ca, pem) = ca();
        let again = FleetCa::from_pem(&pem.cert_pem, &pem.key_pem).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ca.fingerprint(), again.fingerprint());
        assert_eq!(cert_to_pem(ca.cert_der()), pem.cert_pem.replace("\r\n", "\n"));
    }

    #[test]
    fn fingerprint_forms() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex).ok(), Some(hex.clone()));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&format!("sha256:{colons}")).ok(), Some(hex));
        assert!(parse_fingerprint("abc").is_err());
    }

    #[test]
    fn renew_at_two_thirds() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v = Validity::for_ttl(now, Duration::from_secs(90));
        assert_eq!(v.not_before, now - Duration::from_secs(9));
        assert_eq!(v.renew_at(), v.not_before + Duration::from_secs(66));
    }
}
