//! A throw-away certificate authority for integration tests.
//!
//! [`TestCa::new`] makes a self-signed CA (written to `dir/ca.pem`), and
//! [`TestCa::issue`] signs leaf certificates for DNS names and IP addresses
//! with it. [`client_config`] builds a rustls client configuration that
//! trusts exactly one CA file, for talking to servers using those leaves.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imap_gateway::config::{ListenerConfig, ListenerMode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A self-signed test CA able to issue leaf certificates.
pub struct TestCa {
    /// PEM text of the CA certificate.
    pub ca_pem: String,
    /// Where the CA certificate was written (`dir/ca.pem`).
    pub ca_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// Makes a new CA and writes its certificate to `dir/ca.pem`.
    pub fn new(dir: &Path) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .expect("test CA: empty subject alt names are valid");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "imap-gateway test CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "imap-gateway tests");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("test CA: generating the CA key pair");
        let cert = params
            .self_signed(&key)
            .expect("test CA: self-signing the CA certificate");
        let ca_pem = cert.pem();
        let ca_path = dir.join("ca.pem");
        fs::write(&ca_path, &ca_pem)
            .unwrap_or_else(|e| panic!("test CA: writing {}: {e}", ca_path.display()));
        TestCa {
            ca_pem,
            ca_path,
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a server (and client) leaf certificate for `sans`, signed by this CA.
    ///
    /// Entries of `sans` that parse as IP addresses become IP subject alt names,
    /// the rest DNS names. Writes `dir/<name>.pem` (certificate) and
    /// `dir/<name>-key.pem` (PKCS#8 private key) and returns those paths.
    pub fn issue(&self, dir: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans.clone())
            .unwrap_or_else(|e| panic!("test CA: invalid subject alt names {sans:?}: {e}"));
        let cn = sans.first().map(String::as_str).unwrap_or(name);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("test CA: generating a leaf key pair");
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("test CA: signing the leaf certificate {name}: {e}"));
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        fs::write(&cert_path, cert.pem())
            .unwrap_or_else(|e| panic!("test CA: writing {}: {e}", cert_path.display()));
        fs::write(&key_path, key.serialize_pem())
            .unwrap_or_else(|e| panic!("test CA: writing {}: {e}", key_path.display()));
        (cert_path, key_path)
    }
}

/// A root store holding every certificate of the PEM file at `ca_pem_path`.
pub fn root_store(ca_pem_path: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem_path)
        .unwrap_or_else(|e| panic!("reading CA file {}: {e}", ca_pem_path.display()));
    for cert in certs {
        let cert = cert.unwrap_or_else(|e| panic!("parsing {}: {e}", ca_pem_path.display()));
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("adding CA from {}: {e}", ca_pem_path.display()));
    }
    assert!(
        !roots.is_empty(),
        "no certificate in CA file {}",
        ca_pem_path.display()
    );
    roots
}

/// A rustls client configuration (ring provider) trusting only the CA in `ca_pem_path`.
pub fn client_config(ca_pem_path: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls: default protocol versions")
        .with_root_certificates(root_store(ca_pem_path))
        .with_no_client_auth();
    Arc::new(config)
}

/// A gateway listener on an ephemeral loopback port serving `cert` and `key`.
pub fn listener(name: &str, mode: ListenerMode, cert: PathBuf, key: PathBuf) -> ListenerConfig {
    ListenerConfig {
        name: name.into(),
        address: "127.0.0.1:0".parse().expect("a valid socket address"),
        mode,
        tls_cert: Some(cert),
        tls_key: Some(key),
        tls_session_tickets: true,
        allow_plaintext_auth: false,
        proxy_protocol: false,
        proxy_trusted_networks: Vec::new(),
    }
}
