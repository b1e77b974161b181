//! Talking to a node's admin HTTP API (torusctl, torusblk).

use anyhow::{anyhow, bail, Result};

/// One admin API call; an error answer becomes its message, an unreachable node a hint.
pub fn call(method: &str, url: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build();
    let request = agent.request(method, url);
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
            bail!("{msg}")
        }
        Err(ureq::Error::Transport(t)) => Err(anyhow!(
            "cannot reach torusd at {url}: {t} (is torusd running? see --server)"
        )),
    }
}
