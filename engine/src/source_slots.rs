//! Slots for connections (or handshakes) counted in all and per client address, so that one
//! host cannot take every slot: `SourceSlots::take` hands out a `Slot` that gives its place back
//! when dropped. The NBD server counts its handshakes with it, the admin API its connections.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Slots with a cap in all and a cap per address.
pub struct SourceSlots {
    max: usize,
    per_source: usize,
    taken: Mutex<Taken>,
}

#[derive(Default)]
struct Taken {
    all: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every slot is taken.
    All,
    /// That address has its share.
    Source,
}

/// A slot taken; given back when dropped.
pub struct Slot {
    slots: Arc<SourceSlots>,
    source: Option<IpAddr>,
}

impl SourceSlots {
    pub fn new(max: usize, per_source: usize) -> Arc<SourceSlots> {
        Arc::new(SourceSlots {
            max,
            per_source,
            taken: Mutex::new(Taken::default()),
        })
    }

    /// A slot for a client at `source` (`None`: no address, such as a Unix socket's, counted
    /// in all only).
    pub fn take(self: &Arc<Self>, source: Option<IpAddr>) -> Result<Slot, Full> {
        let mut t = self.taken.lock();
        if t.all >= self.max {
            return Err(Full::All);
        }
        if let Some(ip) = source {
            let n = t.by_source.entry(ip).or_insert(0);
            if *n >= self.per_source {
                return Err(Full::Source);
            }
            *n += 1;
        }
        t.all += 1;
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.slots.taken.lock();
        t.all -= 1;
        if let Some(ip) = self.source {
            if let Some(n) = t.by_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    t.by_source.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_share_and_others_the_rest() {
        let slots = SourceSlots::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = slots.take(Some(a)).unwrap();
        let _a2 = slots.take(Some(a)).unwrap();
        assert_eq!(slots.take(Some(a)).err(), Some(Full::Source));
        let _b1 = slots.take(Some(b)).unwrap();
        assert_eq!(slots.take(None).err(), Some(Full::All));
        drop(a1);
        let _a3 = slots.take(Some(a)).unwrap();
        assert!(slots.taken.lock().by_source.len() == 2);
    }
}
