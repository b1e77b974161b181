//! torus-frontend: how clients and the kernel reach a node's volumes. NBD (fixed newstyle,
//! structured replies, base:allocation, multi-connection), the ublk target served by the
//! cores' rings, and the kernel NBD client attached through netlink (`torusblk nbd`).

pub mod exports;
pub mod kernel_nbd;
pub mod nbd;
pub mod service;
pub mod ublk;
