//! The store's test suite, run against SQLite and PostgreSQL.
//!
//! PostgreSQL: `ORRERY_TEST_PG` (a connection string of a database whose
//! user may CREATE DATABASE) if set; otherwise a throwaway server started
//! from `/usr/lib/postgresql/*/bin`. Without either the PostgreSQL tests
//! print `SKIPPED: ...` and pass — unless `CI` is set, where they fail.

mod harness;
mod standalone;
mod suite;

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    crate::suite::$name(&crate::harness::Harness::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(h) = crate::harness::Harness::postgres(stringify!($name)) {
                        crate::suite::$name(&h);
                    }
                }
            )*
        }
    };
}

both_backends!(
    fencing,
    fencing_two_nodes,
    job_commit,
    job_commit_race,
    concurrent_writers,
    concurrent_openers,
    reopen_is_noop,
    future_version_refused,
    checksum_mismatch_refused,
    half_applied_refused,
    bad_input,
    scan_pages,
    job_periods_bounded,
    corrupt_rows_reported,
    durable_commits,
);
