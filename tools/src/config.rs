//! `--config FILE.toml`: a binary's flags read from a TOML file.
//!
//! A key is a flag's long name without its dashes (`data-dir = "/var/lib/torus"`), so the file
//! and the command line mean the same thing and `--help` documents both. The file is turned
//! into arguments placed before the command line's, and the command is parsed with every flag
//! overriding an earlier one: a flag given on the command line overrides the file. Nothing is
//! guessed: a key that names no flag, a value of the wrong kind and a table are refused with
//! the key's name and the file's path.
//!
//! | TOML value | becomes |
//! |---|---|
//! | string, integer, float | `--key VALUE` |
//! | `true` for a switch | `--key`; `false` leaves it out |
//! | array of strings or numbers | `--key A,B,C` (for lists such as `etcd`) |

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::OsString;
use std::path::Path;

/// The flag that names the file: not allowed inside it.
const CONFIG_FLAG: &str = "config";
/// Largest config file read: a config is a few hundred bytes; more is a wrong path.
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// The arguments a config file stands for, in the order of its keys.
pub fn args_from_file(cmd: &clap::Command, path: &Path) -> Result<Vec<OsString>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("{}", path.display()))?
        .len();
    if len > CONFIG_BYTES_MAX {
        bail!(
            "{}: {len} bytes is too large for a config file (at most {CONFIG_BYTES_MAX})",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    args_from_str(cmd, &text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The arguments a config file's text stands for; errors do not name the file.
pub fn args_from_str(cmd: &clap::Command, text: &str) -> Result<Vec<OsString>> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
            .unwrap_or(1);
        anyhow!("line {line}: {}", e.message().trim())
    })?;
    let mut args = Vec::new();
    for (key, value) in &table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != CONFIG_FLAG)
            .ok_or_else(|| unknown_key(cmd, key))?;
        let flag = format!("--{key}");
        let takes_value = arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(on) if !takes_value => {
                if *on {
                    args.push(flag.into());
                }
            }
            _ if !takes_value => {
                bail!("key {key:?}: --{key} is a switch; write {key} = true or leave it out")
            }
            toml::Value::String(s) => args.extend([flag.into(), s.into()]),
            toml::Value::Integer(n) => args.extend([flag.into(), n.to_string().into()]),
            toml::Value::Float(n) => args.extend([flag.into(), n.to_string().into()]),
            toml::Value::Array(items) => {
                let parts = items
                    .iter()
                    .map(|item| match item {
                        toml::Value::String(s) => Ok(s.clone()),
                        toml::Value::Integer(n) => Ok(n.to_string()),
                        _ => Err(anyhow!(
                            "key {key:?}: a list holds strings or numbers, not {}",
                            item.type_str()
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                args.extend([flag.into(), parts.join(",").into()]);
            }
            other => bail!(
                "key {key:?}: --{key} takes a value such as a string or a number, not a {}",
                other.type_str()
            ),
        }
    }
    Ok(args)
}

fn unknown_key(cmd: &clap::Command, key: &str) -> anyhow::Error {
    let dashed = key.replace('_', "-");
    let hint = if dashed != key
        && cmd
            .get_arguments()
            .any(|a| a.get_long() == Some(dashed.as_str()))
    {
        format!(" (did you mean {dashed:?}? keys are written as the flags are)")
    } else if key == CONFIG_FLAG {
        " (a config file cannot name another)".to_owned()
    } else {
        format!(
            " ({} has no --{key}; keys are its long flags, see {} --help)",
            cmd.get_name(),
            cmd.get_name()
        )
    };
    anyhow!("unknown key {key:?}{hint}")
}

/// `argv` with the config file's arguments put after the program name, when `config` names
/// one, so that flags on the command line come later and override them.
pub fn merge(
    cmd: &clap::Command,
    argv: Vec<OsString>,
    config: Option<&Path>,
) -> Result<Vec<OsString>> {
    let Some(path) = config else {
        return Ok(argv);
    };
    let mut merged = Vec::with_capacity(argv.len() + 16);
    let mut rest = argv.into_iter();
    merged.extend(rest.next());
    merged.extend(args_from_file(cmd, path)?);
    merged.extend(rest);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn command() -> Command {
        Command::new("t")
            .args_override_self(true)
            .arg(Arg::new("data-dir").long("data-dir"))
            .arg(Arg::new("cores").long("cores"))
            .arg(Arg::new("etcd").long("etcd"))
            .arg(Arg::new("sparse").long("sparse").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn keys_become_the_flags_of_the_same_name() {
        let args = args_from_str(
            &command(),
            "data-dir = \"/d\"\ncores = 2\netcd = [\"a:1\", \"b:2\"]\nsparse = true\n",
        )
        .unwrap();
        assert_eq!(
            strings(args),
            [
                "--data-dir",
                "/d",
                "--cores",
                "2",
                "--etcd",
                "a:1,b:2",
                "--sparse"
            ]
        );
        let args = args_from_str(&command(), "sparse = false\n").unwrap();
        assert!(args.is_empty());
    }

    #[test]
    fn a_key_that_names_no_flag_is_refused_with_its_name() {
        let e = args_from_str(&command(), "dta-dir = \"/d\"\n").unwrap_err();
        assert!(e.to_string().contains("\"dta-dir\""), "{e}");
        let e = args_from_str(&command(), "data_dir = \"/d\"\n").unwrap_err();
        assert!(e.to_string().contains("did you mean \"data-dir\""), "{e}");
        let e = args_from_str(&command(), "config = \"/other\"\n").unwrap_err();
        assert!(e.to_string().contains("\"config\""), "{e}");
    }

    #[test]
    fn values_of_the_wrong_kind_and_bad_toml_are_refused() {
        for (text, says) in [
            ("sparse = \"yes\"\n", "switch"),
            ("cores = true\n", "not a boolean"),
            ("[data-dir]\nx = 1\n", "not a table"),
            ("etcd = [true]\n", "strings or numbers"),
            ("cores = \n", "line 1"),
            ("\n\ncores = 2 2\n", "line 3"),
        ] {
            let e = args_from_str(&command(), text).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn flags_on_the_command_line_override_the_file() {
        let dir = std::env::temp_dir().join(format!("torus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, "data-dir = \"/from-file\"\ncores = 3\n").unwrap();
        let argv: Vec<OsString> = ["t", "--config", path.to_str().unwrap(), "--cores", "5"]
            .iter()
            .map(OsString::from)
            .collect();
        let merged = merge(&command(), argv, Some(&path)).unwrap();
        let m = command().get_matches_from(merged);
        assert_eq!(m.get_one::<String>("data-dir").unwrap(), "/from-file");
        assert_eq!(m.get_one::<String>("cores").unwrap(), "5");
        let e = args_from_file(&command(), &dir.join("missing.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.toml"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
