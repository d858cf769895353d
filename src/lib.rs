//! s3mount: mount an S3 bucket, or a prefix of one, as a directory.
//!
//! Layers, top to bottom (arrows only point down): `main` -> [`fuse`] -> [`fs`] -> [`data`] ->
//! [`store`]. docs/ARCHITECTURE.md has the map: what each module owns and how a read and a
//! write flow through them.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod config;
pub mod control;
pub mod data;
pub mod fs;
pub mod fuse;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod paths;
pub mod store;
pub mod supervisor;

#[cfg(test)]
mod proptests;
