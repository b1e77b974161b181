//! The NBD server: `protocol` (wire constants and headers), `handshake` (option haggling on a
//! control thread), `transmission` (requests and replies on the cores), `server` (listeners).

pub mod client;
pub mod handshake;
pub mod protocol;
pub mod server;
pub mod transmission;
