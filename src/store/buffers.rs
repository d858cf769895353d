//! Body buffers for large GETs, reused instead of freed.
//!
//! A sequential read allocates and frees 1-8 MiB buffers continuously. Freed, glibc hands such
//! blocks back to the kernel, and the next one faults in every page again (measured: ~15% of the
//! daemon's CPU in a cold read). A few idle buffers are kept here instead, bounded so that the
//! memory they pin stays small next to the global budget (which counts buffers in use).

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

/// Smaller bodies are not worth pooling.
pub const MIN_POOLED: usize = 1 << 20;

#[derive(Debug)]
pub struct BufferPool {
    idle: Mutex<Vec<Vec<u8>>>,
    max_idle_bytes: usize,
}

impl BufferPool {
    pub fn new(max_idle_bytes: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            idle: Mutex::new(Vec::new()),
            max_idle_bytes,
        })
    }

    /// An empty buffer with room for `len` bytes: an idle one of a fitting size if there is
    /// (then `true`), else a new one.
    pub fn take(&self, len: usize) -> (Vec<u8>, bool) {
        if len >= MIN_POOLED {
            let mut idle = self.idle.lock();
            if let Some(i) = idle
                .iter()
                .position(|b| b.capacity() >= len && b.capacity() <= len + len / 4)
            {
                return (idle.swap_remove(i), true);
            }
        }
        (Vec::with_capacity(len), false)
    }

    /// The filled buffer as `Bytes`; when the last reference goes, the buffer comes back here.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < MIN_POOLED {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    /// Keep a buffer for reuse. Beyond the bound the oldest idle buffers are freed instead, so
    /// the pool follows the sizes a reader asks for now (a window grows from 1 to 8 MiB pieces).
    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() > self.max_idle_bytes {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock();
        idle.push(buf);
        let mut held: usize = idle.iter().map(Vec::capacity).sum();
        while held > self.max_idle_bytes {
            held -= idle.remove(0).capacity();
        }
    }

    /// Bytes held by idle buffers.
    pub fn idle_bytes(&self) -> usize {
        self.idle.lock().iter().map(Vec::capacity).sum()
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_the_pool_stays_bounded() {
        let pool = BufferPool::new(8 << 20);
        // A buffer is reused for requests it fits without wasting more than a quarter.
        let (mut a, reused) = pool.take(4 << 20);
        assert!(!reused);
        a.extend_from_slice(&vec![7u8; 4 << 20]);
        let ptr = a.as_ptr();
        let bytes = pool.freeze(a);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "still referenced by a slice");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.idle_bytes(), 4 << 20);
        let (again, reused) = pool.take((7 << 20) / 2);
        assert!(reused);
        assert_eq!(again.as_ptr(), ptr, "the same memory is reused");
        assert!(again.is_empty());
        // Beyond the bound, buffers are freed, not kept.
        let big: Vec<Bytes> = (0..4)
            .map(|_| {
                let (mut v, _) = pool.take(4 << 20);
                v.resize(4 << 20, 1);
                pool.freeze(v)
            })
            .collect();
        drop(big);
        assert!(pool.idle_bytes() <= 8 << 20);
        // A full pool makes room for the newest buffer: the sizes in use now are the ones kept.
        let small = pool.freeze(Vec::with_capacity(2 << 20));
        drop(small);
        let eight = pool.freeze(vec![0u8; 8 << 20]);
        drop(eight);
        assert_eq!(
            pool.idle_bytes(),
            8 << 20,
            "only the 8 MiB buffer fits the bound"
        );
        assert!(pool.take(8 << 20).0.capacity() >= 8 << 20);
        // Small buffers are never pooled.
        drop(pool.freeze(vec![1, 2, 3]));
        assert!(pool.idle_bytes() <= 8 << 20);
    }
}
