//! Files that hold the cluster's decisions are private to the node's user.
//!
//! The Raft store holds every member's address, epoch and the job tokens; nothing but the
//! node itself has reason to read it. Directories are created 0700 and the store file is
//! restricted to 0600 whenever it is opened (also a file created before this rule).

use std::io;
use std::path::Path;

/// Creates `dir` (and missing parents) with mode 0700 on Unix; an existing directory is
/// restricted to 0700 as well.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Restricts an existing file to mode 0600 on Unix.
pub(crate) fn restrict_file(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}
