//! A raw block device as the backing store (`--device`), and NBD over a Unix socket.

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

const T: Duration = Duration::from_secs(120);

fn loop_device(file: &std::path::Path, size: u64, junk: bool) -> LoopDevice {
    let f = std::fs::File::create(file).unwrap();
    f.set_len(size).unwrap();
    if junk {
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"some other filesystem lives here", 0)
            .unwrap();
    }
    drop(f);
    LoopDevice::attach(file, false)
}

/// `--device` on a 1 GiB loop device keeps data (4 MiB written with qemu-io) across a restart; a
/// device holding something else is refused ("not a torus data file") and left untouched.
#[test]
fn block_device_backing_store_keeps_data_and_foreign_devices_are_refused() {
    require_tool("losetup", "mount");
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("device");
    let dev = loop_device(&dir.path().join("disk.img"), 1 << 30, false);
    let mut node = Torusd::start(dir.path(), &["--device", &dev.0]);
    let uri = node.uri("default");
    run_ok(
        Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x5c 0 4M"]),
        T,
    );
    node.restart();
    let out = run_ok(
        Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x5c 0 4M"]),
        T,
    );
    assert!(!out.contains("failed"), "{out}");
    node.stop();

    // A device holding something else is refused with one clear line, and left untouched.
    let other = loop_device(&dir.path().join("other.img"), 256 << 20, true);
    let data_dir = dir.path().join("other-data");
    let out = run(
        Command::new(bin("torusd"))
            .args(["--device", &other.0, "--data-dir"])
            .arg(&data_dir)
            .args([
                "--nbd-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--admin-listen",
                &format!("127.0.0.1:{}", free_port()),
            ]),
        T,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a torus data file"), "{err}");
    let head = std::fs::read(dir.path().join("other.img")).unwrap();
    assert!(
        head.starts_with(b"some other filesystem lives here"),
        "the foreign device was modified"
    );
}

/// NBD over `--nbd-socket` with nbdinfo (it sees 1 GiB) and qemu-io (a write reads back); the
/// socket file is removed at exit.
#[test]
fn nbd_over_a_unix_socket() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("unix");
    let sock = dir.path().join("nbd.sock");
    let mut node = Torusd::start(dir.path(), &["--nbd-socket", &sock.display().to_string()]);
    let uri = format!("nbd+unix:///default?socket={}", sock.display());
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri), T);
    assert_eq!(size.trim(), (1u64 << 30).to_string());
    require_tool("qemu-io", "qemu-utils");
    let qemu_uri = format!("nbd+unix:///default?socket={}", sock.display());
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &qemu_uri,
            "-c",
            "write -P 0x42 4096 8192",
            "-c",
            "read -P 0x42 4096 8192",
        ]),
        T,
    );
    node.stop();
    assert!(!sock.exists(), "the socket file is removed at exit");
}
