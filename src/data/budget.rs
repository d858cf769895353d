//! One global memory budget that every buffer (prefetch, write, cache) is taken from.
//!
//! Optional buffers (prefetch ahead of the reader) use [`Budget::try_reserve`] and are simply
//! not made when the budget is spent. Buffers an application request cannot do without (the
//! bytes a read must return) use [`Budget::reserve_required`], which always succeeds: their sum is
//! bounded by the number of concurrent FUSE requests times their size, and refusing them could
//! deadlock readers against each other's prefetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    /// Woken whenever bytes come back, for writers waiting for room.
    released: tokio::sync::Notify,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            released: tokio::sync::Notify::new(),
        })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Bytes still free.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Optional buffers may use seven eighths of the budget: the rest stays for buffers a request
    /// cannot do without and for what the process needs besides buffers (so the daemon's RSS
    /// stays under the budget even when prefetch and cache take all they may).
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        self.try_reserve_below(bytes, self.limit - self.limit / 8)
    }

    /// Write buffers: take `bytes` within the whole budget, waiting up to `patience` for other
    /// buffers to come back (uploads finishing) when it is spent; past that, take them anyway
    /// (the flag says so). The wait bounds memory when many files are written at once; the
    /// overdraw after it keeps a writer from waiting forever on files that other applications
    /// hold open without writing.
    pub async fn reserve_waiting(
        self: &Arc<Self>,
        bytes: u64,
        patience: Duration,
    ) -> (Reservation, bool) {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(r) = self.try_reserve_below(bytes, self.limit) {
                return (r, false);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                tracing::debug!(
                    bytes,
                    used = self.used(),
                    limit = self.limit,
                    "memory budget spent for {patience:?}; a write buffer goes over it"
                );
                return (self.reserve_required(bytes), true);
            }
        }
    }

    fn try_reserve_below(self: &Arc<Self>, bytes: u64, limit: u64) -> Option<Reservation> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(bytes)?;
            if next > limit {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Some(Reservation {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn reserve_required(self: &Arc<Self>, bytes: u64) -> Reservation {
        let next = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak.fetch_max(next, Ordering::Relaxed);
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }
}

/// Bytes taken from the budget, given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Merge another reservation of the same budget into this one.
    pub fn absorb(&mut self, mut other: Reservation) {
        self.bytes += other.bytes;
        other.bytes = 0;
    }

    /// An empty reservation to grow with [`Reservation::absorb`].
    pub fn empty(budget: &Arc<Budget>) -> Reservation {
        Reservation {
            budget: budget.clone(),
            bytes: 0,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_returned() {
        let b = Budget::new(100);
        let r1 = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(50).is_none());
        let r2 = b.reserve_required(50);
        assert_eq!(b.used(), 110);
        drop(r1);
        drop(r2);
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 110);
        // Optional buffers stop at seven eighths; required ones may use the rest.
        assert!(b.try_reserve(89).is_none());
        let r3 = b.try_reserve(88).unwrap();
        assert!(b.try_reserve(1).is_none());
        let r4 = b.reserve_required(12);
        assert_eq!(b.used(), 100);
        drop((r3, r4));
    }

    #[tokio::test]
    async fn a_waiting_writer_gets_memory_when_it_comes_back_and_never_waits_forever() {
        let b = Budget::new(100);
        let held = b.reserve_required(100);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let (r, _) = b.reserve_waiting(30, Duration::from_secs(30)).await;
                (r, t.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.used(), 100, "still waiting: nothing came back");
        drop(held);
        let (r, waited) = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(r.bytes(), 30);
        assert_eq!(b.peak(), 100, "never over the budget");
        // Nothing comes back: after its patience the writer goes over rather than hang.
        let full = b.reserve_required(70);
        let t = std::time::Instant::now();
        let (over, _) = b.reserve_waiting(10, Duration::from_millis(100)).await;
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert_eq!(b.used(), 110);
        drop((r, full, over));
        assert_eq!(b.used(), 0);
    }
}
