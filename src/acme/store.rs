//! `cache_dir`: the ACME account and the certificate with its key, kept
//! across restarts. The directory is made mode 0700 and every file 0600;
//! each file is written whole to a temporary name and renamed over the old
//! one, so a crash leaves the old file or the new one, never half a key.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const ACCOUNT_FILE: &str = "account.json";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// The account file: the credentials instant-acme hands back, with the
/// directory they belong to (another CA needs another account).
#[derive(Serialize, Deserialize)]
pub struct StoredAccount {
    pub directory: String,
    pub credentials: serde_json::Value,
}

pub struct CacheDir {
    dir: PathBuf,
}

impl CacheDir {
    pub fn new(dir: &Path) -> Self {
        CacheDir {
            dir: dir.to_path_buf(),
        }
    }

    /// Makes the directory (mode 0700) if it is missing, and tightens it if
    /// it is looser.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let mode = std::fs::metadata(&self.dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// A file's contents; `None` when it does not exist.
    pub fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Writes `name` atomically, mode 0600, synced before the rename.
    pub fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let target = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &target)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written?;
        // The rename is durable once the directory entry is.
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(&root.path().join("a/acme"));
        cache.create().unwrap();
        assert_eq!(cache.read(KEY_FILE).unwrap(), None);
        cache.write(KEY_FILE, b"first").unwrap();
        cache.write(KEY_FILE, b"second").unwrap();
        assert_eq!(
            cache.read(KEY_FILE).unwrap().as_deref(),
            Some(&b"second"[..])
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache.dir), 0o700);
        assert_eq!(mode(&cache.dir.join(KEY_FILE)), 0o600);
        let names: Vec<_> = std::fs::read_dir(&cache.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE], "no temporary file is left behind");
    }

    #[test]
    fn a_looser_directory_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("acme");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        CacheDir::new(&dir).create().unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
