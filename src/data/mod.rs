//! Bytes in motion: prefetching reads, the block cache, streamed and staged writes, the one
//! commit engine they share (`commit`), and the memory budget they all draw from.

pub mod budget;
pub mod cache;
pub mod commit;
pub mod direct;
pub mod prefetch;
pub mod staging;
pub mod upload;
