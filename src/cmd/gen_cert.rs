//! `portcullis gen-cert`: a self-signed development certificate (ECDSA P-256).

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use super::Failure;

pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

pub fn gen_cert(out: &Path, hosts: &[String], force: bool) -> Result<(), Failure> {
    let (cert_path, key_path) = (out.join("cert.pem"), out.join("key.pem"));
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(Failure::Usage(format!(
            "{} or {} exists already; pass --force to replace them",
            cert_path.display(),
            key_path.display()
        )));
    }
    let hosts: Vec<String> = if hosts.is_empty() {
        DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        hosts.to_vec()
    };
    write_dev_cert(out, &hosts)?;
    eprintln!(
        "wrote {} and {} (mode 0600) for {}",
        cert_path.display(),
        key_path.display(),
        hosts.join(", ")
    );
    Ok(())
}

/// Writes `cert.pem` and `key.pem` into `dir`, the key readable by its owner only.
pub fn write_dev_cert(dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let certified = rcgen::generate_simple_self_signed(hosts.to_vec())
        .context("cannot generate the certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("cert.pem"), certified.cert.pem())
        .with_context(|| format!("cannot write {}", dir.join("cert.pem").display()))?;
    let key_path = dir.join("key.pem");
    let _ = std::fs::remove_file(&key_path);
    let mut key_file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("cannot write {}", key_path.display()))?
    };
    key_file.write_all(certified.signing_key.serialize_pem().as_bytes())?;
    Ok(())
}
