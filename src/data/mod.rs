//! Bytes in motion: prefetching reads and the memory budget they draw from.

pub mod budget;
pub mod cache;
pub mod prefetch;
pub mod staging;
pub mod upload;
