//! Reading one object through one open file: sequential readers get a growing window of
//! parallel ranged GETs ahead of them; random readers get block-sized GETs for what they ask.
//! Every GET is pinned to the ETag seen at open, so a replaced object is never read mixed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};

use super::budget::{Budget, Reservation};
use crate::store::{ByteRange, ObjectStore, StoreError, StoreResult};

#[derive(Clone, Copy, Debug)]
pub struct PrefetchConfig {
    /// Prefetch window of a reader that has just started (bytes ahead of it).
    pub initial_window: u64,
    /// Largest window one open file may grow to.
    pub max_window: u64,
    /// Largest single ranged GET.
    pub max_request: u64,
    /// Alignment and size of GETs for random reads.
    pub block_size: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            initial_window: 1 << 20,
            max_window: 64 << 20,
            max_request: 8 << 20,
            block_size: 128 << 10,
        }
    }
}

/// Bytes kept behind the reader so short backward seeks don't refetch.
const BACK_KEEP: u64 = 1 << 20;
/// Chunks a random reader keeps around.
const RANDOM_KEEP: usize = 32;

type ChunkData = Shared<BoxFuture<'static, StoreResult<Bytes>>>;

struct Chunk {
    range: ByteRange,
    data: ChunkData,
    _reservation: Reservation,
}

struct ReaderState {
    chunks: BTreeMap<u64, Chunk>,
    /// End of the last read served.
    last_end: u64,
    window: u64,
    /// How far ahead fetches have been issued.
    fetched_end: u64,
    /// Bytes read sequentially since the window last grew.
    consumed: u64,
}

pub struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    key: String,
    etag: Option<String>,
    size: u64,
    cfg: PrefetchConfig,
    budget: Arc<Budget>,
    state: tokio::sync::Mutex<ReaderState>,
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

impl ObjectReader {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: String,
        etag: Option<String>,
        size: u64,
        cfg: PrefetchConfig,
        budget: Arc<Budget>,
    ) -> Self {
        let state = ReaderState {
            chunks: BTreeMap::new(),
            last_end: 0,
            window: cfg.initial_window,
            fetched_end: 0,
            consumed: 0,
        };
        ObjectReader {
            store,
            key,
            etag,
            size,
            cfg,
            budget,
            state: tokio::sync::Mutex::new(state),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Read up to `len` bytes at `offset` (fewer only at the end of the object).
    pub async fn read(&self, offset: u64, len: u32) -> StoreResult<Bytes> {
        if offset >= self.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(self.size);
        let parts: Vec<(ByteRange, ChunkData)> = {
            let mut st = self.state.lock().await;
            let sequential = offset == st.last_end
                || (offset > st.last_end && offset < st.fetched_end.max(st.last_end + st.window))
                || (offset < st.last_end && st.last_end - offset <= BACK_KEEP);
            if sequential {
                // Double the window each time the reader has consumed half of it (not on the
                // first read, so a small read of a large file stays small).
                if st.last_end > 0 {
                    st.consumed += end.saturating_sub(st.last_end.max(offset));
                    if st.consumed >= st.window / 2 {
                        st.window = (st.window * 2).min(self.cfg.max_window);
                        st.consumed = 0;
                    }
                }
                st.chunks.retain(|_, c| c.range.end + BACK_KEEP > offset);
            } else {
                st.window = self.cfg.initial_window;
                st.fetched_end = 0;
                st.consumed = 0;
                while st.chunks.len() > RANDOM_KEEP {
                    st.chunks.pop_first();
                }
            }
            self.fill(&mut st, offset, end, true, sequential);
            if sequential {
                let ahead = (end + st.window).min(self.size);
                self.fill(&mut st, end, ahead, false, true);
            }
            st.last_end = end;
            st.chunks
                .range(..end)
                .filter(|(_, c)| c.range.end > offset)
                .map(|(_, c)| (c.range, c.data.clone()))
                .collect()
        };

        // The usual case: one chunk covers the whole request, answered without a copy.
        if let [(range, data)] = parts.as_slice() {
            if range.start <= offset && range.end >= end {
                let bytes = self.await_chunk(*range, data.clone()).await?;
                let from = (offset - range.start) as usize;
                let to = ((end - range.start) as usize).min(bytes.len());
                return Ok(if from < to {
                    bytes.slice(from..to)
                } else {
                    Bytes::new()
                });
            }
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (range, data) in parts {
            let bytes = self.await_chunk(range, data).await?;
            let from = offset.max(range.start) - range.start;
            let to = (end.min(range.end) - range.start).min(bytes.len() as u64);
            if from >= to {
                break; // object shorter than it claimed: return what there is
            }
            if (range.start + to) < end.min(range.end) {
                out.extend_from_slice(&bytes[from as usize..to as usize]);
                break;
            }
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Wait for a chunk; a failed one is forgotten so the next read fetches it again.
    async fn await_chunk(&self, range: ByteRange, data: ChunkData) -> StoreResult<Bytes> {
        match data.await {
            Ok(b) => Ok(b),
            Err(e) => {
                let mut st = self.state.lock().await;
                if st
                    .chunks
                    .get(&range.start)
                    .is_some_and(|c| c.range == range)
                {
                    st.chunks.remove(&range.start);
                }
                st.fetched_end = st.fetched_end.min(range.start);
                Err(e)
            }
        }
    }

    /// Make sure fetches cover `[from, to)`. Optional (prefetch) fetches stop when the budget is
    /// spent, and the window shrinks.
    fn fill(&self, st: &mut ReaderState, from: u64, to: u64, required: bool, sequential: bool) {
        let mut pos = from;
        while pos < to {
            if let Some((_, c)) = st.chunks.range(..=pos).next_back() {
                if c.range.end > pos {
                    pos = c.range.end;
                    continue;
                }
            }
            let prev_end = st
                .chunks
                .range(..=pos)
                .next_back()
                .map(|(_, c)| c.range.end)
                .unwrap_or(0);
            let next_start = st
                .chunks
                .range(pos + 1..)
                .next()
                .map(|(s, _)| *s)
                .unwrap_or(self.size);
            let (start, want) = if sequential {
                let piece = (st.window / 2).clamp(self.cfg.block_size, self.cfg.max_request);
                (pos, piece.max(to.min(pos + self.cfg.max_request) - pos))
            } else {
                let start = align_down(pos, self.cfg.block_size).max(prev_end);
                let want = (to - start).div_ceil(self.cfg.block_size) * self.cfg.block_size;
                (
                    start,
                    want.min(self.cfg.max_request)
                        .max(to.min(start + self.cfg.max_request) - start),
                )
            };
            let stop = (start + want).min(next_start).min(self.size);
            let range = ByteRange::new(start, stop);
            let reservation = if required {
                self.budget.reserve_required(range.len())
            } else {
                match self.budget.try_reserve(range.len()) {
                    Some(r) => r,
                    None => {
                        st.window = (st.window / 2).max(self.cfg.initial_window);
                        return;
                    }
                }
            };
            let data = self.spawn_fetch(range);
            st.chunks.insert(
                start,
                Chunk {
                    range,
                    data,
                    _reservation: reservation,
                },
            );
            st.fetched_end = st.fetched_end.max(stop);
            pos = stop;
        }
    }

    fn spawn_fetch(&self, range: ByteRange) -> ChunkData {
        let store = self.store.clone();
        let key = self.key.clone();
        let etag = self.etag.clone();
        let task = tokio::spawn(async move { store.get_range(&key, range, etag.as_deref()).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(StoreError::Other(format!("fetch task failed: {e}"))))
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mock::MockStore;
    use std::sync::atomic::Ordering;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn reader(store: &Arc<MockStore>, key: &str, size: u64, budget: u64) -> ObjectReader {
        ObjectReader::new(
            store.clone(),
            key.into(),
            None,
            size,
            PrefetchConfig::default(),
            Budget::new(budget),
        )
    }

    #[tokio::test]
    async fn sequential_read_is_exact_and_uses_few_large_requests() {
        let store = Arc::new(MockStore::new());
        let body = data(20 << 20);
        store.insert("k", body.clone());
        let r = reader(&store, "k", body.len() as u64, 256 << 20);
        let mut got = Vec::new();
        let mut off = 0u64;
        loop {
            let b = r.read(off, 128 << 10).await.unwrap();
            if b.is_empty() {
                break;
            }
            off += b.len() as u64;
            got.extend_from_slice(&b);
        }
        assert_eq!(got, body);
        let gets = store.counters.get.load(Ordering::Relaxed);
        let fetched = store.counters.bytes_fetched.load(Ordering::Relaxed);
        // 160 kernel-sized reads must become far fewer GETs, and nothing is fetched twice.
        assert!(gets <= 20, "{gets} GETs for 20 MiB");
        assert_eq!(fetched, body.len() as u64);
    }

    #[tokio::test]
    async fn random_reads_fetch_blocks_not_windows() {
        let store = Arc::new(MockStore::new());
        let body = data(64 << 20);
        store.insert("k", body.clone());
        let r = reader(&store, "k", body.len() as u64, 256 << 20);
        let offsets = [50u64 << 20, 3 << 20, 33 << 20, 60 << 20, 10 << 20, 47 << 20];
        for &o in &offsets {
            let b = r.read(o, 4096).await.unwrap();
            assert_eq!(&b[..], &body[o as usize..o as usize + 4096]);
        }
        let fetched = store.counters.bytes_fetched.load(Ordering::Relaxed);
        // The first read may start a small window; the rest fetch one block each.
        assert!(
            fetched <= (2 << 20) + offsets.len() as u64 * (128 << 10),
            "fetched {fetched}"
        );
    }

    #[tokio::test]
    async fn exhausted_budget_shrinks_prefetch_and_never_blocks() {
        let store = Arc::new(MockStore::new());
        let body = data(8 << 20);
        store.insert("k", body.clone());
        let budget = Budget::new(0);
        let r = ObjectReader::new(
            store.clone(),
            "k".into(),
            None,
            body.len() as u64,
            PrefetchConfig::default(),
            budget.clone(),
        );
        let mut off = 0;
        while off < body.len() as u64 {
            let b = r.read(off, 1 << 20).await.unwrap();
            assert_eq!(&b[..], &body[off as usize..off as usize + b.len()]);
            off += b.len() as u64;
        }
        // Only required bytes were fetched: no prefetch fits a zero budget.
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            body.len() as u64
        );
    }

    #[tokio::test]
    async fn replaced_object_fails_instead_of_mixing() {
        let store = Arc::new(MockStore::new());
        let etag = store.insert("k", data(4 << 20));
        let r = ObjectReader::new(
            store.clone(),
            "k".into(),
            Some(etag),
            4 << 20,
            PrefetchConfig {
                initial_window: 128 << 10,
                ..Default::default()
            },
            Budget::new(1 << 30),
        );
        r.read(0, 4096).await.unwrap();
        store.insert("k", vec![1u8; 4 << 20]);
        let err = r.read(3 << 20, 4096).await.unwrap_err();
        assert!(matches!(err, StoreError::PreconditionFailed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn failed_fetch_is_retried_by_the_next_read() {
        let store = Arc::new(MockStore::new());
        let body = data(1 << 20);
        store.insert("k", body.clone());
        store.inject_fault(
            crate::store::mock::Op::Get,
            "k",
            StoreError::Other("503".into()),
            1,
        );
        let r = reader(&store, "k", body.len() as u64, 1 << 30);
        assert!(r.read(0, 4096).await.is_err());
        let b = r.read(0, 4096).await.unwrap();
        assert_eq!(&b[..], &body[..4096]);
    }
}
