//! A small bounded connection pool: at most `max` connections, made lazily;
//! a caller waits at most `wait` for one to come free.

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::StoreError;

type Connect<C> = Box<dyn Fn() -> Result<C, StoreError> + Send + Sync>;

pub(crate) struct Pool<C> {
    state: Mutex<State<C>>,
    freed: Condvar,
    max: usize,
    wait: Duration,
    connect: Connect<C>,
    healthy: fn(&C) -> bool,
}

struct State<C> {
    idle: Vec<C>,
    /// Connections in existence (idle + lent out + being made).
    open: usize,
}

impl<C> Pool<C> {
    pub(crate) fn new(
        max: usize,
        wait: Duration,
        connect: Connect<C>,
        healthy: fn(&C) -> bool,
        first: C,
    ) -> Pool<C> {
        Pool {
            state: Mutex::new(State {
                idle: vec![first],
                open: 1,
            }),
            freed: Condvar::new(),
            max: max.max(1),
            wait,
            connect,
            healthy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // A panic elsewhere while holding the lock leaves consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self) -> Result<Pooled<'_, C>, StoreError> {
        let mut st = self.lock();
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return match (self.connect)() {
                    Ok(conn) => Ok(Pooled {
                        pool: self,
                        conn: Some(conn),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let max = self.max;
            let (guard, res) = self
                .freed
                .wait_timeout_while(st, self.wait, |s| s.idle.is_empty() && s.open >= max)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            if res.timed_out() && st.idle.is_empty() && st.open >= max {
                return Err(StoreError::Busy(format!(
                    "no pooled connection came free within {} ms (store.pool_size = {}, store.pool_wait_ms)",
                    self.wait.as_millis(),
                    self.max
                )));
            }
        }
    }
}

/// A lent connection; goes back to the pool on drop (or is discarded if broken).
pub(crate) struct Pooled<'a, C> {
    pool: &'a Pool<C>,
    conn: Option<C>,
}

impl<C> Deref for Pooled<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        // Always Some until drop.
        self.conn
            .as_ref()
            .expect("pooled connection present until drop")
    }
}

impl<C> DerefMut for Pooled<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn
            .as_mut()
            .expect("pooled connection present until drop")
    }
}

impl<C> Drop for Pooled<'_, C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let keep = (self.pool.healthy)(&conn);
            let mut st = self.pool.lock();
            if keep {
                st.idle.push(conn);
            } else {
                st.open -= 1;
                drop(st);
                drop(conn);
            }
            self.pool.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn bounded_and_times_out() {
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let pool: Pool<usize> = Pool::new(
            2,
            Duration::from_millis(50),
            Box::new(move || Ok(m.fetch_add(1, Ordering::SeqCst) + 1)),
            |_| true,
            0,
        );
        let a = pool.get().unwrap();
        let b = pool.get().unwrap();
        assert!(matches!(pool.get(), Err(StoreError::Busy(_))));
        drop(a);
        let c = pool.get().unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 1);
        drop((b, c));
    }

    #[test]
    fn broken_connections_are_replaced() {
        let pool: Pool<i32> = Pool::new(
            1,
            Duration::from_millis(50),
            Box::new(|| Ok(7)),
            |c| *c >= 0,
            -1,
        );
        drop(pool.get().unwrap()); // -1 is unhealthy: discarded
        assert_eq!(*pool.get().unwrap(), 7);
    }
}
