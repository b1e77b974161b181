//! Shared code of the torus binaries: size parsing, config files, the volume services of a
//! node (`node`) and the admin HTTP API that serves them (`admin`).

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod node;
pub mod size;
pub mod token;
pub mod transfer;

/// The version every binary prints: the package version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TORUS_GIT_COMMIT"),
    ")"
);
