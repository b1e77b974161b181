//! Firewall rules for the tests that drop packets: `nft -f -` with a script, in a network
//! namespace or in this one.

use super::require_tool;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `nft -f -` on `script`, in network namespace `netns` if given; fails the test if nft
/// does.
pub fn nft(netns: Option<&str>, script: &str) {
    let nft = require_tool("nft", "nftables");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new(require_tool("ip", "iproute2"));
            c.args(["netns", "exec", ns]).arg(nft);
            c
        }
        None => Command::new(nft),
    };
    let mut child = command
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft {script}");
}
