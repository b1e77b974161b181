//! Secrets the cluster's nodes share through etcd (the admin API's tokens): made by whichever
//! node asks first, the same for every node after. Whoever reads etcd reads them, as it reads
//! and can change the map: etcd is the cluster's root of trust (`docs/security.md`).

use super::Cluster;
use crate::etcd::EtcdError;

impl Cluster {
    /// The secret under `secrets/NAME` in etcd, made with `make` and stored if there is none
    /// yet (by a compare-and-swap: of two nodes asking at once, both get the one stored).
    pub async fn shared_secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, EtcdError> {
        let key = format!("secrets/{name}");
        if let Some((v, _)) = self.kv.get(&key).await? {
            return Ok(v);
        }
        let made = make();
        if self.kv.cas(&key, 0, made.clone()).await? {
            return Ok(made);
        }
        match self.kv.get(&key).await? {
            Some((v, _)) => Ok(v),
            None => Err(EtcdError::Corrupt {
                key,
                why: "the secret vanished as it was made".into(),
            }),
        }
    }
}
