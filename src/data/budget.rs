//! One global memory budget that every buffer (prefetch, write, cache) is taken from.
//!
//! Optional buffers (prefetch ahead of the reader) use [`Budget::try_reserve`] and are simply
//! not made when the budget is spent. Buffers an application request cannot do without (the
//! bytes a read must return) use [`Budget::reserve_required`], which always succeeds: their sum is
//! bounded by the number of concurrent FUSE requests times their size, and refusing them could
//! deadlock readers against each other's prefetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
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
        let optional_limit = self.limit - self.limit / 8;
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(bytes)?;
            if next > optional_limit {
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
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
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
}
