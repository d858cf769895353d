//! Reading one object through one open file: sequential readers get a growing window of
//! parallel ranged GETs ahead of them; random readers get GETs of just the pages they ask for.
//! Every GET is pinned to the ETag seen at open, so a replaced object is never read mixed.
//! Fetched bytes go to the block cache, and come from it when they are there. A read of the
//! whole object, in order, is checked against the CRC32 the store keeps for it.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};

use super::budget::{Budget, Reservation};
use super::cache::{BlockCache, ObjectId, BLOCK};
use crate::store::{
    composite_crc32, crc32_header, ByteRange, ObjectStore, PieceCrcs, StoreError, StoreResult,
};

#[derive(Clone, Copy, Debug)]
pub struct PrefetchConfig {
    /// Prefetch window of a reader that has just started (bytes ahead of it).
    pub initial_window: u64,
    /// Largest window one open file may grow to.
    pub max_window: u64,
    /// Largest single ranged GET.
    pub max_request: u64,
    /// Alignment of GETs for random reads (they fetch only the pages asked for).
    pub random_align: u64,
    /// How far behind the furthest read a read may land and still be part of the same
    /// sequential stream: the kernel's read-ahead sends several requests at once and they
    /// arrive in any order (about twice its read-ahead window).
    pub reorder: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            initial_window: 1 << 20,
            max_window: 64 << 20,
            max_request: 8 << 20,
            random_align: 4 << 10,
            reorder: 8 << 20,
        }
    }
}

/// A read this far at most beyond the last one still moves the same stream forward (the kernel
/// skips pages it holds; Mountpoint keeps its stream over forward seeks of 16 MiB too).
const FORWARD_SKIP: u64 = 16 << 20;
/// Forward reads in a row that make a reader judged random sequential again.
const FORWARD_RUN: u32 = 3;

/// Bytes kept behind the reader so short backward seeks don't refetch.
const BACK_KEEP: u64 = 1 << 20;
/// Smallest first request of a file read from its start (larger files; see `fill`).
const FIRST_READ: u64 = 64 << 10;
/// Chunks a random reader keeps around.
const RANDOM_KEEP: usize = 32;

type ChunkData = Shared<BoxFuture<'static, StoreResult<Fetched>>>;

/// A chunk's bytes, with the CRC32 of each piece between block boundaries when the store
/// computed them as the bytes arrived (GETs of a reader that verifies the whole object).
#[derive(Clone)]
struct Fetched {
    bytes: Bytes,
    crcs: Option<Arc<[u32]>>,
}

impl Fetched {
    fn plain(bytes: Bytes) -> Self {
        Fetched { bytes, crcs: None }
    }
}

struct Chunk {
    range: ByteRange,
    data: ChunkData,
    _reservation: Reservation,
}

/// CRC32 of blocks `from..to` of an object of `size` bytes, from their CRCs.
fn combine_blocks(blocks: &[u32], size: u64, from: usize, to: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (i, crc) in blocks.iter().enumerate().take(to).skip(from) {
        let len = (size - i as u64 * BLOCK).min(BLOCK);
        h.combine(&crc32fast::Hasher::new_with_initial_len(*crc, len));
    }
    h.finalize()
}

struct ReaderState {
    chunks: BTreeMap<u64, Chunk>,
    /// End of the last read served (of a sequential stream: the furthest end).
    last_end: u64,
    /// A sequential stream is under way: reads continued one another and its prefetch runs.
    streaming: bool,
    window: u64,
    /// How far ahead fetches have been issued.
    fetched_end: u64,
    /// Bytes read sequentially since the window last grew.
    consumed: u64,
    /// Reads in a row that each began at or after the end of the one before, at most
    /// [`FORWARD_SKIP`] beyond it: a reader moving forward over gaps (the pages the kernel
    /// still caches of a file read before) is a sequential reader.
    forward_run: u32,
    /// CRC32s of each 1 MiB block read so far, in order from the object's start, so that both
    /// the whole object's CRC32 and the part CRC32s of a COMPOSITE multipart checksum can be
    /// derived (CRC32s combine without the data). None once given up.
    verify: Option<PieceCrcs>,
    /// Set once bytes of this handle failed a checksum: everything it could still hand out is
    /// suspect (the kernel retries pages one by one), so every later read fails too.
    poisoned: Option<StoreError>,
}

pub struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    key: String,
    etag: Option<String>,
    /// Cache identity (objects without an ETag are not cached).
    obj: Option<ObjectId>,
    size: u64,
    cfg: PrefetchConfig,
    budget: Arc<Budget>,
    cache: Arc<BlockCache>,
    /// The object's stored CRC32 when known (HEAD at open, or a whole-object GET).
    checksum: Arc<parking_lot::Mutex<Option<String>>>,
    state: tokio::sync::Mutex<ReaderState>,
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

impl ObjectReader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: String,
        etag: Option<String>,
        size: u64,
        checksum: Option<String>,
        cfg: PrefetchConfig,
        budget: Arc<Budget>,
        cache: Arc<BlockCache>,
    ) -> Self {
        let state = ReaderState {
            chunks: BTreeMap::new(),
            last_end: 0,
            streaming: false,
            window: cfg.initial_window,
            fetched_end: 0,
            consumed: 0,
            forward_run: 0,
            verify: Some(PieceCrcs::new(0, BLOCK)),
            poisoned: None,
        };
        ObjectReader {
            store,
            obj: etag.as_deref().map(|e| ObjectId::new(&key, e)),
            key,
            etag,
            size,
            cfg,
            budget,
            cache,
            checksum: Arc::new(parking_lot::Mutex::new(checksum)),
            state: tokio::sync::Mutex::new(state),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read up to `len` bytes at `offset` (fewer only at the end of the object).
    pub async fn read(&self, offset: u64, len: u32) -> StoreResult<Bytes> {
        if offset >= self.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(self.size);
        let result = self.read_checked(offset, end).await;
        if let Err(e @ StoreError::Checksum(_)) = &result {
            let mut st = self.state.lock().await;
            st.poisoned = Some(e.clone());
            st.chunks.clear();
            st.verify = None;
            if let Some(obj) = &self.obj {
                self.cache.forget(obj, self.size);
            }
        }
        result
    }

    async fn read_checked(&self, offset: u64, end: u64) -> StoreResult<Bytes> {
        let parts: Vec<(ByteRange, ChunkData)> = {
            let mut st = self.state.lock().await;
            if let Some(e) = &st.poisoned {
                return Err(e.clone());
            }
            // Sequential: the read continues the last one, or, while a stream's prefetch runs,
            // lands ahead in what is fetched or a little behind the furthest read (the kernel
            // sends read-ahead requests in parallel and they arrive out of order: a reset there
            // would restart the window at every reordering).
            let streaming = st.streaming && st.fetched_end > st.last_end;
            let forward = offset >= st.last_end && offset - st.last_end <= FORWARD_SKIP;
            st.forward_run = if forward {
                st.forward_run.saturating_add(1)
            } else {
                0
            };
            let sequential = offset == st.last_end
                || (streaming && offset > st.last_end && offset < st.fetched_end)
                || (streaming && offset < st.last_end && st.last_end - offset <= self.cfg.reorder)
                // Forward over a gap: kept while streaming, resumed after a few in a row.
                || (forward && (st.streaming || st.forward_run >= FORWARD_RUN));
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
                // Reads that arrive late, out of order, still find their chunks: keep what lies
                // within the reordering distance behind the furthest read, and what the
                // whole-object checksum has not taken in yet.
                // (No check running: nothing is kept for it.)
                let verified_to = st.verify.as_ref().map_or(u64::MAX, PieceCrcs::pos);
                let keep_from = st.last_end.max(end).saturating_sub(self.cfg.reorder / 2);
                st.chunks.retain(|_, c| {
                    c.range.end + BACK_KEEP > offset.min(keep_from) || c.range.end > verified_to
                });
            } else {
                if st.streaming {
                    crate::metrics::prefetch_reset();
                }
                st.window = self.cfg.initial_window;
                st.streaming = false;
                st.fetched_end = 0;
                st.consumed = 0;
                while st.chunks.len() > RANDOM_KEEP {
                    st.chunks.pop_first();
                }
            }
            // The first read of a larger file from its start is fetched alone, small: a
            // reader after the first bytes only (`head`, `file`) gets them sooner and fetches
            // nothing more; the window starts with the next read.
            let first_alone = self.first_read_small(&st, offset);
            self.fill(&mut st, offset, end, true, sequential);
            if sequential {
                st.streaming = true;
                let from = st.last_end.max(end);
                if !first_alone {
                    let ahead = (from + st.window).min(self.size);
                    self.fill(&mut st, from, ahead, false, true);
                }
                st.last_end = from;
            } else {
                st.last_end = end;
            }
            st.chunks
                .range(..end)
                .filter(|(_, c)| c.range.end > offset)
                .map(|(_, c)| (c.range, c.data.clone()))
                .collect()
        };

        let out = self.assemble(offset, end, parts).await?;
        let whole_crc = {
            let mut st = self.state.lock().await;
            self.advance_verify(&mut st)
        };
        if let Some(blocks) = whole_crc {
            self.verify_whole(&blocks).await?;
        }
        Ok(out)
    }

    /// The bytes `[offset, end)` from the chunks covering them.
    async fn assemble(
        &self,
        offset: u64,
        end: u64,
        parts: Vec<(ByteRange, ChunkData)>,
    ) -> StoreResult<Bytes> {
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
            out.extend_from_slice(&bytes[from as usize..to as usize]);
            if (range.start + to) < end.min(range.end) {
                break;
            }
        }
        Ok(out.freeze())
    }

    /// Fold every completed chunk at the verifier's position into the running CRC. Returns the
    /// block CRCs of the whole object once it has all been seen.
    fn advance_verify(&self, st: &mut ReaderState) -> Option<Vec<u32>> {
        loop {
            let v = st.verify.as_mut()?;
            let pos = v.pos();
            if pos >= self.size {
                return st.verify.take().map(PieceCrcs::finish);
            }
            let covering = st
                .chunks
                .range(..=pos)
                .next_back()
                .filter(|(_, c)| c.range.end > pos);
            let Some((_, c)) = covering else {
                // Nothing fetched or being fetched at the check's position, and the reader has
                // moved on past it (over pages the kernel still holds): nothing will fetch it
                // now, and keeping every later chunk for the check would spend the budget and
                // stop the prefetch. The check is for whole reads in order only.
                if st.last_end > pos.saturating_add(self.cfg.reorder) {
                    tracing::debug!(key = %self.key, at = pos, "whole-object checksum not checked: the reader skipped bytes");
                    st.verify = None;
                }
                return None;
            };
            match c.data.peek() {
                // Whole, from its start, with the CRCs of its pieces: no pass over the bytes.
                Some(Ok(Fetched {
                    bytes,
                    crcs: Some(crcs),
                })) if pos == c.range.start && bytes.len() as u64 == c.range.len() => {
                    v.update_from(crcs, c.range.len());
                }
                Some(Ok(Fetched { bytes, .. })) => {
                    let from = (pos - c.range.start) as usize;
                    if bytes.len() <= from {
                        st.verify = None; // shorter than it claimed: nothing to verify
                        return None;
                    }
                    v.update(&bytes[from..]);
                }
                _ => return None,
            }
        }
    }

    /// Compare the CRC32 of the whole object, read in order, with the one the store keeps.
    async fn verify_whole(&self, blocks: &[u32]) -> StoreResult<()> {
        let known = self.checksum.lock().clone();
        let stored = match known {
            Some(c) => Some(c),
            // Opened from a listing: ask the store (only if it still is the version read).
            None => match self.store.head(&self.key).await {
                Ok(m) if m.etag == self.etag => m.checksum_crc32,
                _ => None,
            },
        };
        let Some(stored) = stored else {
            return Ok(());
        };
        let ours = match stored.split_once('-') {
            None => crc32_header(combine_blocks(blocks, self.size, 0, blocks.len())),
            Some((_, parts)) => match self.composite_of(blocks, parts).await {
                Some(c) => c,
                None => {
                    tracing::debug!(key = %self.key, stored = %stored, "part layout of the COMPOSITE checksum unknown: whole-object read not verified");
                    return Ok(());
                }
            },
        };
        if ours == stored {
            return Ok(());
        }
        // `read` drops the cached blocks and poisons the handle for every checksum failure.
        crate::metrics::count(crate::metrics::CHECKSUM_MISMATCHES);
        tracing::error!(key = %self.key, stored = %stored, read = %ours, "data read does not match the object's stored CRC32; failing the read and dropping cached blocks");
        Err(StoreError::Checksum(format!(
            "{}: CRC32 of the data read is {ours}, the store says {stored}",
            self.key
        )))
    }

    /// The COMPOSITE checksum (`crc-N`) of what was read, with the part size the store reports
    /// for part 1 (parts of one size but the last, whole MiBs, as every common tool writes them).
    async fn composite_of(&self, blocks: &[u32], parts: &str) -> Option<String> {
        let n: u64 = parts.parse().ok().filter(|n| *n > 0)?;
        let part = if n == 1 {
            self.size.max(1)
        } else {
            self.store.part_size(&self.key, 1).await.ok()?
        };
        if part == 0 || self.size.div_ceil(part) != n || (n > 1 && part % BLOCK != 0) {
            return None;
        }
        let per = (part / BLOCK).max(1) as usize;
        let crcs: Vec<u32> = if n == 1 {
            vec![combine_blocks(blocks, self.size, 0, blocks.len())]
        } else {
            (0..blocks.len())
                .step_by(per)
                .map(|i| combine_blocks(blocks, self.size, i, (i + per).min(blocks.len())))
                .collect()
        };
        Some(composite_crc32(&crcs))
    }

    /// Is a read at `pos` the first read from the start, fetched small and alone? For files
    /// larger than two blocks, and not with a disk cache (which keeps only whole blocks).
    fn first_read_small(&self, st: &ReaderState, pos: u64) -> bool {
        st.last_end == 0 && pos == 0 && self.size > 2 * BLOCK && !self.cache.has_disk()
    }

    /// Wait for a chunk; a failed one is forgotten so the next read fetches it again.
    async fn await_chunk(&self, range: ByteRange, data: ChunkData) -> StoreResult<Bytes> {
        match data.await {
            Ok(f) => Ok(f.bytes),
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

    /// Make sure fetches (or cache reads) cover `[from, to)`. Optional (prefetch) fetches stop
    /// when the budget is spent, and the window shrinks.
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
            let limit = next_start.min(self.size);

            // Already in memory: no fetch, no reservation (the cache holds it).
            if let Some((range, data)) = self
                .obj
                .as_ref()
                .and_then(|o| self.cache.lookup_memory(o, pos))
            {
                let stop = range.end.min(limit);
                let slice = data.slice((pos - range.start) as usize..(stop - range.start) as usize);
                st.chunks.insert(
                    pos,
                    Chunk {
                        range: ByteRange::new(pos, stop),
                        data: futures::future::ready(Ok(Fetched::plain(slice)))
                            .boxed()
                            .shared(),
                        _reservation: Reservation::empty(&self.budget),
                    },
                );
                st.fetched_end = st.fetched_end.max(stop);
                pos = stop;
                continue;
            }

            let on_disk = self
                .obj
                .as_ref()
                .is_some_and(|o| self.cache.on_disk(o, pos / BLOCK));
            let (start, stop) = if on_disk {
                (pos, ((pos / BLOCK + 1) * BLOCK).min(limit))
            } else {
                let (start, want) = if sequential && required && self.first_read_small(st, pos) {
                    // The first read of a larger file from its start: fetch what it asks for
                    // (at least FIRST_READ), not a whole block, so its first byte does not wait
                    // for a megabyte; the window's prefetch fetches the rest of the block with
                    // the next read.
                    let asked = (to - pos).div_ceil(FIRST_READ) * FIRST_READ;
                    (pos, asked.min(self.cfg.max_request))
                } else if sequential {
                    let piece = (st.window / 2).clamp(BLOCK, self.cfg.max_request);
                    (pos, piece.max(to.min(pos + self.cfg.max_request) - pos))
                } else {
                    let a = self.cfg.random_align.max(1);
                    let start = align_down(pos, a).max(prev_end);
                    (
                        start,
                        (to.div_ceil(a) * a - start).min(self.cfg.max_request),
                    )
                };
                let mut stop = (start + want).min(limit);
                // End sequential fetches on block boundaries, so whole blocks reach the cache.
                if sequential && stop < limit {
                    let aligned = align_down(stop, BLOCK);
                    if aligned > pos {
                        stop = aligned;
                    }
                }
                // Stop where cached bytes begin.
                if let Some(o) = &self.obj {
                    let mut b = start / BLOCK + 1;
                    while b * BLOCK < stop {
                        if self.cache.contains(o, b * BLOCK) {
                            stop = b * BLOCK;
                            break;
                        }
                        b += 1;
                    }
                }
                (start, stop)
            };
            let range = ByteRange::new(start, stop);
            let reservation = if required {
                self.budget.reserve_required(range.len())
            } else {
                match self.reserve_optional(range.len()) {
                    Some(r) => r,
                    None => {
                        st.window = (st.window / 2).max(self.cfg.initial_window);
                        return;
                    }
                }
            };
            tracing::debug!(key = %self.key, start, stop, required, sequential, on_disk, "fetch");
            let data = self.spawn_fetch(range, on_disk, st.verify.is_some());
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

    /// Budget for a prefetch; the memory cache gives way before prefetching does.
    fn reserve_optional(&self, bytes: u64) -> Option<Reservation> {
        self.budget.try_reserve(bytes).or_else(|| {
            self.cache.shrink(bytes);
            self.budget.try_reserve(bytes)
        })
    }

    /// Fetch `range`: from the disk cache when it holds the block, else from the store (the
    /// whole object in one GET, with its checksum, when the range is the whole object; with
    /// piece CRCs for the whole-object check when `crcs`).
    fn spawn_fetch(&self, range: ByteRange, from_disk: bool, crcs: bool) -> ChunkData {
        let store = self.store.clone();
        let key = self.key.clone();
        let etag = self.etag.clone();
        let obj = self.obj.clone();
        let cache = self.cache.clone();
        let checksum = self.checksum.clone();
        let size = self.size;
        let task = tokio::spawn(async move {
            if let (true, Some(o)) = (from_disk, &obj) {
                let block = range.start / BLOCK;
                let block_start = block * BLOCK;
                let block_len = (block_start + BLOCK).min(size) - block_start;
                if let Some(b) = cache.read_disk(o, block, block_len).await {
                    return Ok(Fetched::plain(b.slice(
                        (range.start - block_start) as usize..(range.end - block_start) as usize,
                    )));
                }
            }
            let fetched = if range.start == 0 && range.end == size {
                let (data, sum) = store.get_whole(&key, size, etag.as_deref()).await?;
                if sum.is_some() {
                    *checksum.lock() = sum;
                }
                Fetched::plain(data)
            } else if crcs {
                let (bytes, crcs) = store
                    .get_range_crcs(&key, range, etag.as_deref(), BLOCK)
                    .await?;
                Fetched {
                    bytes,
                    crcs: Some(crcs.into()),
                }
            } else {
                Fetched::plain(store.get_range(&key, range, etag.as_deref()).await?)
            };
            if let Some(o) = &obj {
                cache.insert(o, range, &fetched.bytes, size, fetched.crcs.as_deref());
            }
            Ok(fetched)
        });
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
    use crate::data::cache::CacheConfig;
    use crate::store::mock::MockStore;
    use std::sync::atomic::Ordering;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn reader(store: &Arc<MockStore>, key: &str, size: u64, budget: u64) -> ObjectReader {
        let budget = Budget::new(budget);
        ObjectReader::new(
            store.clone(),
            key.into(),
            None,
            size,
            None,
            PrefetchConfig::default(),
            budget.clone(),
            BlockCache::disabled(budget),
        )
    }

    /// A reader of the object's current version sharing `cache`.
    async fn cached_reader(
        store: &Arc<MockStore>,
        key: &str,
        cache: &Arc<BlockCache>,
    ) -> ObjectReader {
        let m = store.head(key).await.unwrap();
        ObjectReader::new(
            store.clone(),
            key.into(),
            m.etag,
            m.size,
            None,
            PrefetchConfig::default(),
            Budget::new(1 << 30),
            cache.clone(),
        )
    }

    async fn read_all(r: &ObjectReader, step: u32) -> StoreResult<Vec<u8>> {
        let mut got = Vec::new();
        loop {
            let b = r.read(got.len() as u64, step).await?;
            if b.is_empty() {
                return Ok(got);
            }
            got.extend_from_slice(&b);
        }
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

    /// The kernel's parallel read-ahead requests arrive out of order (here each 4 MiB comes as
    /// 1 MiB reads in the order 1, 0, 3, 2): the stream stays one stream, its window keeps
    /// growing, and nothing is fetched twice.
    #[tokio::test]
    async fn reordered_read_ahead_stays_one_stream() {
        let store = Arc::new(MockStore::new());
        let body = data(64 << 20);
        store.insert("k", body.clone());
        let r = reader(&store, "k", body.len() as u64, 256 << 20);
        const MIB: u64 = 1 << 20;
        let mut order: Vec<u64> = (0..4).collect();
        for group in (4..64).step_by(4) {
            order.extend([group + 1, group, group + 3, group + 2]);
        }
        for m in order {
            let b = r.read(m * MIB, MIB as u32).await.unwrap();
            assert!(
                b[..] == body[(m * MIB) as usize..((m + 1) * MIB) as usize],
                "MiB {m} differs"
            );
        }
        let gets = store.counters.get.load(Ordering::Relaxed);
        let fetched = store.counters.bytes_fetched.load(Ordering::Relaxed);
        assert_eq!(fetched, body.len() as u64, "nothing fetched twice");
        // A window restarted at every reordering would take 1 and 2 MiB GETs: ~40 of them.
        assert!(gets <= 16, "{gets} GETs for 64 MiB");
    }

    /// A re-read of a file whose pages the kernel still holds in part: the reads that reach
    /// the filesystem move forward with gaps, 4-32 KiB each, and do not start at 0. They
    /// must become a stream with a window, not one small GET per read (measured before: 1,842
    /// GETs for 512 MiB, the file fetched 4-32 KiB at a time).
    #[tokio::test]
    async fn a_forward_reader_over_gaps_keeps_a_window() {
        let store = Arc::new(MockStore::new());
        let body = data(64 << 20);
        store.insert("k", body.clone());
        let r = reader(&store, "k", body.len() as u64, 256 << 20);
        let mut off = 3 << 20;
        let mut reads = 0;
        while off < body.len() as u64 {
            let len = [4096u64, 16384, 8192, 32768][reads % 4];
            let b = r.read(off, len as u32).await.unwrap();
            assert!(b[..] == body[off as usize..(off + b.len() as u64) as usize]);
            reads += 1;
            // The next page the kernel does not hold is a little further on.
            off += len + [4096u64, 61440, 12288, 200_704][reads % 4];
        }
        let gets = store.counters.get.load(Ordering::Relaxed);
        assert!(reads > 500, "{reads} reads");
        assert!(
            gets <= 40,
            "{gets} GETs for {reads} forward reads over gaps"
        );
    }

    /// A re-read from the start with every other 64 KiB still in the kernel's page cache
    /// (the benchmark's pattern): the first read is fetched alone, the next one starts after a
    /// gap that nothing fetches, so the whole-object check can never pass it. It must give up
    /// rather than hold every later chunk for it: with them held, the budget ran out, the
    /// prefetch stopped and each read became a GET of its own (291 MB/s against 429 cold at
    /// 20 ms RTT).
    #[tokio::test]
    async fn a_re_read_over_gaps_from_the_start_keeps_its_window_within_the_budget() {
        let store = Arc::new(MockStore::new());
        let body = data(128 << 20);
        store.insert("k", body.clone());
        let r = reader(&store, "k", body.len() as u64, 64 << 20);
        let mut off = 0u64;
        let mut reads = 0;
        while off < body.len() as u64 {
            let b = r.read(off, 64 << 10).await.unwrap();
            assert!(b[..] == body[off as usize..(off + b.len() as u64) as usize]);
            reads += 1;
            off += 128 << 10;
        }
        let gets = store.counters.get.load(Ordering::Relaxed);
        assert_eq!(reads, 1024);
        assert!(gets <= 40, "{gets} GETs for {reads} reads over gaps");
    }

    /// The first read of a large file from its start waits for what it asked for (64 KiB at
    /// least), not a whole block; a file of up to two blocks still starts with a whole block.
    #[tokio::test]
    async fn a_first_read_from_the_start_fetches_what_it_asks_for() {
        let store = Arc::new(MockStore::new());
        let body = data(8 << 20);
        store.insert("big", body.clone());
        // No room for prefetch: only the bytes the read needs are fetched.
        let r = reader(&store, "big", body.len() as u64, 1);
        assert_eq!(&r.read(0, 4096).await.unwrap()[..], &body[..4096]);
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            64 << 10
        );
        // With room as well: the first read is fetched alone, then the stream goes on.
        let r = reader(&store, "big", body.len() as u64, 256 << 20);
        store.reset_counters();
        assert_eq!(&r.read(0, 4096).await.unwrap()[..], &body[..4096]);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            64 << 10
        );
        // The next reads start the window.
        let r = reader(&store, "big", body.len() as u64, 256 << 20);
        store.reset_counters();
        let mut got = Vec::new();
        while got.len() < body.len() {
            let b = r.read(got.len() as u64, 128 << 10).await.unwrap();
            got.extend_from_slice(&b);
        }
        assert!(got == body);
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            8 << 20
        );
        // A file of up to two blocks: its first block in one GET.
        store.insert("small", body[..2 << 20].to_vec());
        store.reset_counters();
        let r = reader(&store, "small", 2 << 20, 1);
        assert_eq!(&r.read(0, 4096).await.unwrap()[..], &body[..4096]);
        assert_eq!(store.counters.get.load(Ordering::Relaxed), 1);
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            1 << 20
        );
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
        // Scattered reads fetch the pages they ask for, nothing around them.
        assert_eq!(fetched, offsets.len() as u64 * 4096, "fetched {fetched}");
    }

    #[tokio::test]
    async fn second_reader_is_served_from_memory() {
        let store = Arc::new(MockStore::new());
        let body = data(6 << 20);
        store.insert("k", body.clone());
        let cache = BlockCache::new(
            &CacheConfig {
                memory_bytes: 64 << 20,
                disk: None,
            },
            Budget::new(1 << 30),
        )
        .unwrap();
        let r = cached_reader(&store, "k", &cache).await;
        assert_eq!(read_all(&r, 128 << 10).await.unwrap(), body);
        let gets = store.counters.get.load(Ordering::Relaxed);
        let r2 = cached_reader(&store, "k", &cache).await;
        assert_eq!(read_all(&r2, 128 << 10).await.unwrap(), body);
        assert_eq!(
            store.counters.get.load(Ordering::Relaxed),
            gets,
            "re-read went to the store"
        );
    }

    #[tokio::test]
    async fn disk_cache_serves_a_new_mount_and_refetches_a_damaged_block() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            memory_bytes: 0,
            disk: Some(crate::data::cache::DiskCacheConfig {
                dir: tmp.path().join("c"),
                max_bytes: 1 << 30,
                namespace: "mock".into(),
            }),
        };
        let store = Arc::new(MockStore::new());
        let body = data((5 << 20) + 123);
        let etag = store.insert("k", body.clone());
        {
            let cache = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap();
            let r = cached_reader(&store, "k", &cache).await;
            assert_eq!(read_all(&r, 128 << 10).await.unwrap(), body);
            for _ in 0..500 {
                if cache.disk_usage().unwrap().0 == 6 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(cache.disk_usage().unwrap().0, 6);
        }
        // "Remount": a new cache on the same directory. Damage block 2 on disk.
        let cache = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap();
        let path = crate::data::cache::block_path(
            cfg.disk.as_ref().unwrap(),
            &ObjectId::new("k", &etag),
            2,
        );
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 5000] ^= 1;
        std::fs::write(&path, raw).unwrap();
        store.reset_counters();
        let r = cached_reader(&store, "k", &cache).await;
        assert_eq!(read_all(&r, 128 << 10).await.unwrap(), body);
        // Only the damaged block came from the store.
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            1 << 20
        );
        // It is written to the disk cache again, good this time (and before the directory goes).
        for _ in 0..500 {
            if cache.disk_usage().unwrap().0 == 6
                && std::fs::read(&path).map_or(0, |b| b.len()) == n
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(cache.disk_usage().unwrap().0, 6);
    }

    #[tokio::test]
    async fn corrupted_whole_read_fails_and_leaves_nothing_cached() {
        for size in [100_000usize, 12 << 20] {
            let store = Arc::new(MockStore::new());
            let body = data(size);
            store.insert("k", body.clone());
            let cache = BlockCache::new(
                &CacheConfig {
                    memory_bytes: 64 << 20,
                    disk: None,
                },
                Budget::new(1 << 30),
            )
            .unwrap();
            store.corrupt_next_gets(1);
            let r = cached_reader(&store, "k", &cache).await;
            let err = read_all(&r, 128 << 10).await.unwrap_err();
            assert!(matches!(err, StoreError::Checksum(_)), "{size}: {err:?}");
            assert_eq!(cache.memory_used(), 0, "bad bytes stayed cached");
            // Read again: good data, verified.
            let r = cached_reader(&store, "k", &cache).await;
            assert_eq!(read_all(&r, 128 << 10).await.unwrap(), body, "{size}");
        }
    }

    #[tokio::test]
    async fn out_of_order_start_is_still_verified() {
        // The kernel's parallel read-ahead: the first request to arrive is not at offset 0.
        let store = Arc::new(MockStore::new());
        let body = data(20 << 20);
        store.insert("k", body.clone());
        let cache = BlockCache::disabled(Budget::new(1 << 30));
        let r = cached_reader(&store, "k", &cache).await;
        store.corrupt_next_gets(1);
        let early = r.read(2 << 20, 128 << 10).await.unwrap();
        assert_ne!(&early[..], &body[2 << 20..(2 << 20) + (128 << 10)]);
        let mut off = 0u64;
        let err = loop {
            match r.read(off, 1 << 20).await {
                Ok(b) if b.is_empty() => panic!("corrupted read passed verification"),
                Ok(b) => off += b.len() as u64,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StoreError::Checksum(_)), "{err:?}");
        // Found once every byte has been seen (prefetched data may complete it before EOF).
        assert!(off > 2 << 20, "failed at {off}");
        // The kernel retries pages one by one: none of them may come back unchecked.
        let again = r.read(2 << 20, 4096).await.unwrap_err();
        assert!(matches!(again, StoreError::Checksum(_)), "{again:?}");
    }

    #[tokio::test]
    async fn composite_multipart_checksums_are_verified() {
        // (size, part size, verifiable)
        for (size, part, checked) in [
            ((12 << 20) + 333, 5 << 20, true),
            (3 << 20, 8 << 20, true),
            ((12 << 20) + 333, 5_000_000, false),
        ] {
            let store = Arc::new(MockStore::new());
            let body = data(size);
            store.insert_composite("k", body.clone(), part);
            let cache = BlockCache::disabled(Budget::new(1 << 30));
            let r = cached_reader(&store, "k", &cache).await;
            assert_eq!(read_all(&r, 1 << 20).await.unwrap(), body, "{size}/{part}");
            store.corrupt_next_gets(1);
            let r = cached_reader(&store, "k", &cache).await;
            let res = read_all(&r, 1 << 20).await;
            if checked {
                assert!(
                    matches!(res, Err(StoreError::Checksum(_))),
                    "{size}/{part}: {res:?}"
                );
            } else {
                // Parts not on MiB boundaries: not verifiable, and not an error either.
                assert!(res.is_ok(), "{size}/{part}");
            }
        }
    }

    #[test]
    fn the_verifier_takes_piece_crcs_as_it_takes_bytes() {
        let body = data((5 << 20) + 777);
        let mut by_bytes = PieceCrcs::new(0, BLOCK);
        by_bytes.update(&body);
        let want = by_bytes.finish();
        // Chunks as a reader fetches them: a small first read, then pieces of odd sizes, each
        // fed by the CRC32s of its stretches between block boundaries.
        let mut by_crcs = PieceCrcs::new(0, BLOCK);
        let mut pos = 0usize;
        for len in [
            64 << 10,
            (1 << 20) - (64 << 10),
            3 << 20,
            100_000,
            usize::MAX,
        ] {
            let end = pos.saturating_add(len).min(body.len());
            let crcs = crate::store::piece_crcs(&body[pos..end], pos as u64, BLOCK);
            by_crcs.update_from(&crcs, (end - pos) as u64);
            pos = end;
        }
        assert_eq!(by_crcs.finish(), want);
    }

    #[tokio::test]
    async fn whole_read_of_a_small_object_costs_one_get() {
        let store = Arc::new(MockStore::new());
        let body = data(300_000);
        store.insert("k", body.clone());
        let cache = BlockCache::disabled(Budget::new(1 << 30));
        let r = cached_reader(&store, "k", &cache).await;
        store.reset_counters();
        assert_eq!(read_all(&r, 128 << 10).await.unwrap(), body);
        // Verified with the checksum that came with the GET: no HEAD.
        assert_eq!(store.counters.get.load(Ordering::Relaxed), 1);
        assert_eq!(store.counters.head.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn exhausted_budget_shrinks_prefetch_and_never_blocks() {
        let store = Arc::new(MockStore::new());
        let body = data(8 << 20);
        store.insert("k", body.clone());
        let r = reader(&store, "k", body.len() as u64, 0);
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
            None,
            PrefetchConfig {
                initial_window: 128 << 10,
                ..Default::default()
            },
            Budget::new(1 << 30),
            BlockCache::disabled(Budget::new(1 << 30)),
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
