//! Records, the `Sink` trait, and the two sinks: standard output and a
//! size-rotated file. Sinks run on their own writer thread; they may block,
//! fail or be slow — the caller of the logging macros never sees it.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::Level;

/// One log record, shared (behind an `Arc`) by every sink it is routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Wall-clock milliseconds since the Unix epoch when it was submitted.
    pub at_ms: u64,
    pub level: Level,
    /// The channel (tracing target) it was submitted on.
    pub channel: Arc<str>,
    pub message: String,
}

/// Where records end up. Called only from the sink's own writer thread.
pub trait Sink: Send + 'static {
    /// Writes one record (may buffer). An error is counted, never fatal.
    fn write(&mut self, rec: &Record) -> io::Result<()>;
    /// Makes buffered records durable/visible; called when the queue runs empty.
    fn flush(&mut self) -> io::Result<()>;
}

/// Appends `rec` as one line: `2026-11-27T15:04:05.123Z WARN channel: message\n`.
/// Line breaks inside the message are escaped so one record is one line.
pub fn format_line(rec: &Record, out: &mut String) {
    push_timestamp(rec.at_ms, out);
    out.push(' ');
    out.push_str(level_str(rec.level));
    out.push(' ');
    out.push_str(&rec.channel);
    out.push_str(": ");
    for c in rec.message.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\n');
}

fn level_str(level: Level) -> &'static str {
    match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => "INFO",
        Level::WARN => "WARN",
        Level::ERROR => "ERROR",
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T15:04:05.123Z`.
fn push_timestamp(unix_ms: u64, out: &mut String) {
    let secs = unix_ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let _ = write!(
        out,
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        unix_ms % 1000
    );
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Standard output, one [`format_line`] per record, buffered until the
/// queue runs empty.
pub struct StdoutSink {
    out: BufWriter<io::Stdout>,
    line: String,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self {
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
            line: String::with_capacity(256),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, rec: &Record) -> io::Result<()> {
        self.line.clear();
        format_line(rec, &mut self.line);
        self.out.write_all(self.line.as_bytes())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A file `dir/base_name` that rotates to `base_name.1` .. `base_name.<keep>`
/// (oldest dropped) before it would exceed `max_bytes`. Disk use is bounded
/// by about `(keep + 1) * max_bytes`.
pub struct RotatingFile {
    dir: PathBuf,
    base_name: String,
    max_bytes: u64,
    keep: u32,
    /// `None` after a failed reopen; the next write retries.
    file: Option<BufWriter<File>>,
    size: u64,
    line: String,
}

impl RotatingFile {
    /// Opens (appending) `dir/base_name`, creating `dir` if needed.
    pub fn open(
        dir: impl AsRef<Path>,
        base_name: &str,
        max_bytes: u64,
        keep: u32,
    ) -> io::Result<Self> {
        if base_name.is_empty() || base_name.contains(['/', '\\']) || max_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a rotating file needs a plain base name and max_bytes > 0",
            ));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let mut me = Self {
            dir,
            base_name: base_name.to_string(),
            max_bytes,
            keep,
            file: None,
            size: 0,
            line: String::with_capacity(256),
        };
        me.reopen()?;
        Ok(me)
    }

    /// The path of the current file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.base_name)
    }

    fn rotated(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{}.{n}", self.base_name))
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path())?;
        self.size = file.metadata()?.len();
        self.file = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        if self.keep == 0 {
            remove_if_exists(&self.path())?;
        } else {
            remove_if_exists(&self.rotated(self.keep))?;
            for n in (1..self.keep).rev() {
                rename_if_exists(&self.rotated(n), &self.rotated(n + 1))?;
            }
            rename_if_exists(&self.path(), &self.rotated(1))?;
        }
        self.reopen()
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Sink for RotatingFile {
    fn write(&mut self, rec: &Record) -> io::Result<()> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        format_line(rec, &mut line);
        let len = line.len() as u64;
        let result = (|| {
            if self.file.is_none() || (self.size > 0 && self.size + len > self.max_bytes) {
                self.rotate()?;
            }
            let file = self
                .file
                .as_mut()
                .ok_or_else(|| io::Error::other("no file"))?;
            file.write_all(line.as_bytes())?;
            self.size += len;
            Ok(())
        })();
        self.line = line;
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(msg: &str) -> Record {
        Record {
            at_ms: 1_795_791_845_123, // 2026-11-27T15:04:05.123Z
            level: Level::WARN,
            channel: Arc::from("orrery_node::lease"),
            message: msg.to_string(),
        }
    }

    #[test]
    fn line_format() {
        let mut s = String::new();
        format_line(&rec("lease lapsed\nagain"), &mut s);
        assert_eq!(
            s,
            "2026-11-27T15:04:05.123Z WARN orrery_node::lease: lease lapsed\\nagain\n"
        );
    }

    #[test]
    fn calendar_edges() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let mut s = String::new();
        push_timestamp(951_868_799_999, &mut s);
        assert_eq!(s, "2000-02-29T23:59:59.999Z");
    }

    #[test]
    fn rotation_keeps_at_most_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFile::open(dir.path(), "node.log", 300, 2).unwrap();
        for i in 0..100 {
            f.write(&rec(&format!("record {i}"))).unwrap();
        }
        f.flush().unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["node.log", "node.log.1", "node.log.2"]);
        for n in &names {
            let len = fs::metadata(dir.path().join(n)).unwrap().len();
            assert!(len <= 300, "{n} has {len} bytes");
        }
        let current = fs::read_to_string(dir.path().join("node.log")).unwrap();
        assert!(current.ends_with("record 99\n"), "{current}");
        let older = fs::read_to_string(dir.path().join("node.log.1")).unwrap();
        assert!(!older.contains("record 99"));
    }

    #[test]
    fn keep_zero_truncates_and_reopen_appends() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut f = RotatingFile::open(dir.path(), "a.log", 200, 0).unwrap();
            for i in 0..20 {
                f.write(&rec(&format!("r{i}"))).unwrap();
            }
            f.flush().unwrap();
        }
        let n = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1, "keep = 0 keeps only the current file");
        let before = fs::metadata(dir.path().join("a.log")).unwrap().len();
        let mut f = RotatingFile::open(dir.path(), "a.log", 10_000, 0).unwrap();
        f.write(&rec("appended")).unwrap();
        f.flush().unwrap();
        assert!(fs::metadata(dir.path().join("a.log")).unwrap().len() > before);
        assert!(RotatingFile::open(dir.path(), "x/y", 10, 1).is_err());
    }
}
