//! Certificates made in a test (rcgen): a CA, a server certificate for `localhost` and
//! `127.0.0.1`, and a client certificate, written as PEM files in a directory: `ca.crt`,
//! `server.crt`, `server.key`, `client.crt`, `client.key`.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// The CA's certificate (PEM), after writing every file into `dir`.
pub fn issue(dir: &Path) -> anyhow::Result<String> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "graylane test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    for (names, file) in [
        (
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            "server",
        ),
        (vec!["envoy-1".to_string()], "client"),
    ] {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(names)?.signed_by(&key, &ca_cert, &ca_key)?;
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem())?;
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem())?;
    }
    std::fs::write(dir.join("ca.crt"), ca_cert.pem())?;
    Ok(ca_cert.pem())
}
