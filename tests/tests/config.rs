//! `torusd --config FILE.toml`: a node started from a config file is the node its flags make,
//! and a mistake in the file stops torusd with one line naming the key and the file.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use torus_tests::*;

/// Starts torusd with `args` in `dir` and returns it once its one stdout line (the serving
/// line) is out, with that line.
fn serve(dir: &Path, args: &[String]) -> (Child, String) {
    let log = std::fs::File::create(dir.join("torusd.log")).unwrap();
    let mut child = Command::new(bin("torusd"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start torusd");
    let (line, _stdout) = ready_line(&mut child, &dir.join("torusd.log"));
    (child, line)
}

/// SIGTERM, and torusd must exit 0.
fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("torusd stops");
    assert!(status.success(), "torusd exited with {status}");
}

/// What a client and an operator see of a node: the serving line, the export as nbdinfo
/// shows it (over TCP and over the Unix socket), the volume list but its creation time, and
/// the data dir's files with their sizes (but the metadata's, which holds that time).
fn observe(dir: &Path, line: &str, nbd_port: u16, admin_port: u16) -> String {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let tcp = run_ok(
        Command::new(&nbdinfo)
            .arg("--json")
            .arg(format!("nbd://127.0.0.1:{nbd_port}/default")),
        Duration::from_secs(20),
    );
    let unix = run_ok(
        Command::new(&nbdinfo).arg("--json").arg(format!(
            "nbd+unix:///default?socket={}",
            dir.join("nbd.sock").display()
        )),
        Duration::from_secs(20),
    );
    let volumes = run_ok(
        Command::new(bin("torusctl"))
            .args(["--server", &format!("http://127.0.0.1:{admin_port}")])
            .args(["volume", "list", "--json"]),
        Duration::from_secs(20),
    );
    // When the volume was made differs between the two nodes; everything else must not.
    let volumes: String = volumes
        .lines()
        .filter(|l| !l.contains("\"created_unix\""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut files: Vec<String> = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            // metadata.json holds the creation time, whose digits may differ in number.
            match name.as_str() {
                "metadata.json" => name,
                _ => format!("{name} {}", e.metadata().unwrap().len()),
            }
        })
        .collect();
    files.sort();
    format!("{line}\n{tcp}\n{unix}\n{volumes}\n{}", files.join("\n"))
}

/// A config file that sets the flags a single node uses (data dir, store size, sparse, cores,
/// both NBD listeners, the admin address, the default volume's size) starts a node that looks
/// the same to nbdinfo (TCP and Unix socket), torusctl and the data dir as one started with
/// the same flags. Fails if torusd ignored the file (the node would come up on the default
/// ports with a 1 GiB volume and a 4 GiB store).
#[test]
fn a_node_started_from_a_config_file_is_the_node_its_flags_make() {
    let dir = TempDir::new("config-same");
    let (nbd_port, admin_port) = (free_port(), free_port());
    let settings = [
        ("data-dir", "data".to_owned()),
        ("size", "512M".to_owned()),
        ("sparse", String::new()),
        ("cores", "1".to_owned()),
        ("nbd-listen", format!("127.0.0.1:{nbd_port}")),
        ("nbd-socket", "nbd.sock".to_owned()),
        ("admin-listen", format!("127.0.0.1:{admin_port}")),
        ("default-volume-size", "256M".to_owned()),
    ];
    let mut flags = Vec::new();
    let mut toml = String::from("# written by the config test\n");
    for (key, value) in &settings {
        flags.push(format!("--{key}"));
        if value.is_empty() {
            toml.push_str(&format!("{key} = true\n"));
        } else if let Ok(n) = value.parse::<u32>() {
            flags.push(value.clone());
            toml.push_str(&format!("{key} = {n}\n"));
        } else {
            flags.push(value.clone());
            toml.push_str(&format!("{key} = {value:?}\n"));
        }
    }
    let (child, line) = serve(dir.path(), &flags);
    let from_flags = observe(dir.path(), &line, nbd_port, admin_port);
    stop(child);
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();

    let config = dir.path().join("torusd.toml");
    std::fs::write(&config, toml).unwrap();
    let (child, line) = serve(
        dir.path(),
        &["--config".to_owned(), config.display().to_string()],
    );
    let from_file = observe(dir.path(), &line, nbd_port, admin_port);
    stop(child);
    assert_eq!(from_file, from_flags);
    assert!(from_file.contains("268435456"), "{from_file}");
    assert!(from_file.contains("blocks 536870912"), "{from_file}");
}

/// A key that names no flag (a typo), a switch given a string, and a file that is not TOML
/// each stop torusd before it creates anything, with one line on stderr that names the key
/// (or the line) and the file, and a non-zero exit.
#[test]
fn a_mistake_in_the_config_file_is_one_line_naming_the_key_and_the_file() {
    let dir = TempDir::new("config-typo");
    let config = dir.path().join("torusd.toml");
    for (text, names) in [
        ("data-dir = \"data\"\ndta-dir = \"x\"\n", "\"dta-dir\""),
        ("sparse = \"yes\"\n", "\"sparse\""),
        ("data-dir = \"data\"\nsize = \n", "line 2"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = run(
            Command::new(bin("torusd"))
                .arg("--config")
                .arg(&config)
                .current_dir(dir.path()),
            Duration::from_secs(20),
        );
        assert!(!out.status.success(), "{text:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(names), "{text:?}: {err}");
        assert!(err.contains(&config.display().to_string()), "{err}");
        assert!(
            !dir.path().join("data").exists(),
            "{text:?} created the data dir"
        );
    }
    let out = run(
        Command::new(bin("torusd"))
            .args(["--config", "/nonexistent/torusd.toml"])
            .current_dir(dir.path()),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/torusd.toml"), "{err}");
}
