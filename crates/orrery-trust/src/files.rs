//! Key and certificate files: private directories (0700), private keys (0600), every
//! file written whole (temporary file, fsync, rename, fsync of the directory) and read
//! with a size bound.

use crate::error::TrustError;
use crate::MAX_FILE_BYTES;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Who may read a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// 0600: private keys, the serial counter.
    Private,
    /// 0644: certificates.
    Public,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) 0700; an existing directory is restricted to 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), TrustError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir).map_err(io_err(dir))
    }
}

fn open_new(path: &Path, access: Access) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(match access {
            Access::Private => 0o600,
            Access::Public => 0o644,
        });
    }
    #[cfg(not(unix))]
    let _ = access;
    let file = opts.open(path)?;
    #[cfg(unix)]
    if access == Access::Private {
        // A leftover temporary file keeps its old mode through `open`: restrict it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Writes `bytes` to `dir/name` atomically and durably; the file never exists with
/// looser permissions than `access`.
pub(crate) fn write_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    access: Access,
) -> Result<PathBuf, TrustError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = open_new(&tmp, access)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    write().map_err(io_err(&path))?;
    Ok(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Reads `dir/name`, refusing a file larger than [`MAX_FILE_BYTES`].
pub(crate) fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>, TrustError> {
    let path = dir.join(name);
    let file = File::open(&path).map_err(io_err(&path))?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(&path))?;
    if buf.len() > MAX_FILE_BYTES {
        return Err(TrustError::FileTooLarge {
            path,
            max: MAX_FILE_BYTES,
        });
    }
    Ok(buf)
}

/// Reads `dir/name` as UTF-8 text (PEM, the serial counter).
pub(crate) fn read_text(dir: &Path, name: &str) -> Result<String, TrustError> {
    let bytes = read_file(dir, name)?;
    String::from_utf8(bytes).map_err(|_| TrustError::Pem {
        path: dir.join(name),
        reason: "not UTF-8 text".into(),
    })
}
