//! Shared code of the torus binaries: size parsing and the admin HTTP API.

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod size;
pub mod transfer;
