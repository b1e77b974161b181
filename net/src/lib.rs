//! torus-net: what nodes share. Now the metadata trait and the embedded single-node store;
//! the node-to-node protocol, placement and replication arrive with the cluster issue.

#![forbid(unsafe_code)]

pub mod metadata;
