//! s3mount: mount an S3 bucket, or a prefix of one, as a directory.
//!
//! Layers, top to bottom (arrows only point down): `main` -> [`fuse`] -> [`fs`] -> [`data`] ->
//! [`store`]. See DESIGN.md for the map.

pub mod cli;
pub mod config;
pub mod data;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod store;

#[cfg(test)]
mod proptests;
