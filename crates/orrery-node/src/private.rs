//! Files that hold a secret are the node user's alone.
//!
//! A node's configuration carries the cluster secret and the admin token,
//! its data directory the Raft store and the logs, a local cluster's
//! directory the shared store. Directories are created 0700 and files that
//! hold a secret are written 0600 (created so, never widened afterwards);
//! existing ones are narrowed to the same modes.
//!
//! What it must never do: widen a mode, or follow a caller-supplied path
//! anywhere but where it was asked to write.

use std::io::{self, Write};
use std::path::Path;

/// Mode of every directory orrery creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file that holds a secret or a key.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700; an existing
/// directory is narrowed to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Narrows `dir` and every directory directly inside it (logs, Raft store,
/// cluster log) to 0700; symbolic links are left alone.
pub fn narrow_dirs(dir: &Path) -> io::Result<()> {
    private_dir(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            private_dir(&entry.path())?;
        }
    }
    Ok(())
}

/// Narrows an existing file to mode 0600 (absent is fine).
pub fn restrict_file(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Writes `bytes` to `path` in a file only its owner may read: created
/// 0600, an existing file narrowed to 0600 before it is rewritten.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).truncate(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    restrict_file(path)?;
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn dirs_and_files_are_private_and_narrowed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("secret.toml");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"secret = 1").unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "secret = 1");
        let g = d.join("new");
        write_private(&g, b"y").unwrap();
        assert_eq!(mode(&g), 0o600);
        restrict_file(&d.join("absent")).unwrap();
        let sub = t.path().join("a/logs");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        narrow_dirs(&t.path().join("a")).unwrap();
        assert_eq!(mode(&sub), 0o700);
    }
}
