//! Talking to a node's admin HTTP API (torusctl, torusblk), with the admin token found as
//! `crate::token::find_for` says.

use crate::token;
use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;
use std::sync::OnceLock;

static TOKEN_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The token file named on the command line (`--token-file`), for every later call.
pub fn use_token_file(path: Option<PathBuf>) {
    let _ = TOKEN_FILE.set(path);
}

/// One admin API call; an error answer becomes its message, an unreachable node a hint.
pub fn call(method: &str, url: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    let explicit = TOKEN_FILE.get().and_then(|p| p.as_deref());
    let found = token::find_for(url, explicit).map_err(|e| anyhow!("admin token: {e}"))?;
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build();
    let mut request = agent.request(method, url);
    if let Some((t, _)) = &found {
        request = request.set("Authorization", &format!("Bearer {}", t.as_str()));
    }
    let result = match body {
        Some(b) => request.send_json(b),
        None => request.call(),
    };
    match result {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            let msg = v
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {code}"));
            match (code, &found) {
                (401, None) => bail!("{msg}\n(no token file found for {url}: give --token-file DATA_DIR/admin.token, or set TORUS_TOKEN_FILE)"),
                (401, Some((_, path))) => bail!("{msg} (the token in {})", path.display()),
                _ => bail!("{msg}"),
            }
        }
        Err(ureq::Error::Transport(t)) => Err(anyhow!(
            "cannot reach torusd at {url}: {t} (is torusd running? see --server)"
        )),
    }
}
