//! Shared code of the torus binaries: size parsing and the admin HTTP API.

pub mod admin;
pub mod size;
