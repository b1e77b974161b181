//! A real ext4 on a torus volume without a kernel NBD driver: nbdfuse exposes the export as a
//! file, losetup makes it a block device, then mkfs.ext4, mount, copy 100 MiB, umount,
//! fsck.ext4 -fn; after a torusd restart the file's sha256 still matches.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use torus_tests::*;

const T: Duration = Duration::from_secs(300);

struct Fuse {
    child: Child,
    mountpoint: std::path::PathBuf,
}

impl Fuse {
    fn start(dir: &Path, uri: &str) -> Fuse {
        let mountpoint = dir.join("fuse");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let child = Command::new("nbdfuse")
            .arg(&mountpoint)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nbdfuse");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mountpoint.join("nbd").exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not show its file");
            std::thread::sleep(Duration::from_millis(100));
        }
        Fuse { child, mountpoint }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path), T)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// nbdfuse + losetup + mkfs.ext4 + mount, 100 MiB copied, `fsck.ext4 -fn` clean; after a torusd
/// restart fsck is still clean and the file's sha256 matches.
#[test]
fn ext4_on_nbdfuse_and_loop_survives_restart() {
    require_tool("nbdfuse", "nbdfuse");
    require_tool("losetup", "mount");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("fsck.ext4", "e2fsprogs");
    let dir = TempDir::new("ext4");
    let mut node = Torusd::start(dir.path(), &[]);
    let data = dir.path().join("data.bin");
    let mut bytes = vec![0u8; 100 << 20];
    Rng(seed()).fill(&mut bytes);
    std::fs::write(&data, &bytes).unwrap();
    drop(bytes);
    let expected = sha256(&data);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    {
        let fuse = Fuse::start(dir.path(), &node.uri("default"));
        let dev = LoopDevice::attach(&fuse.mountpoint.join("nbd"), true);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.0), T);
        run_ok(Command::new("mount").arg(&dev.0).arg(&mnt), T);
        run_ok(Command::new("cp").arg(&data).arg(mnt.join("data.bin")), T);
        run_ok(Command::new("umount").arg(&mnt), T);
        run_ok(Command::new("fsck.ext4").arg("-fn").arg(&dev.0), T);
    }
    node.restart();
    {
        let fuse = Fuse::start(dir.path(), &node.uri("default"));
        let dev = LoopDevice::attach(&fuse.mountpoint.join("nbd"), true);
        run_ok(Command::new("fsck.ext4").arg("-fn").arg(&dev.0), T);
        run_ok(
            Command::new("mount")
                .args(["-o", "ro"])
                .arg(&dev.0)
                .arg(&mnt),
            T,
        );
        let got = sha256(&mnt.join("data.bin"));
        run_ok(Command::new("umount").arg(&mnt), T);
        assert_eq!(got, expected, "file changed across a restart");
    }
    node.stop();
}
