//! torus-frontend: how clients reach a node's volumes. NBD now (fixed newstyle, structured
//! replies, base:allocation, multi-connection); the ublk target and kernel attach come next.

pub mod exports;
pub mod nbd;
