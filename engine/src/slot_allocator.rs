//! Free-slot bitmap of one core's region.
//!
//! Slots are handed out next-fit from a cursor, so a stream of writes (random or not) lands on
//! consecutive slots and the disk sees sequential writes. A slot freed by an overwrite is not
//! reusable until the mapping that replaced it is durable: the store keeps such slots on a
//! pending list and calls `release` only after the journal commit that records the change.
//!
//! A slot can be referred to by several volumes (a snapshot or a clone shares the blocks of
//! its origin). Most slots have one reference; the extra references of shared slots are
//! counted in a side table, and `release` drops one reference, freeing the slot with its last.

pub struct SlotAllocator {
    words: Vec<u64>,
    slot_count: u32,
    free: u32,
    cursor: u32,
    /// References beyond the first, of slots that more than one volume maps.
    extra: std::collections::HashMap<u32, u32>,
}

impl SlotAllocator {
    /// All slots free.
    pub fn new(slot_count: u32) -> SlotAllocator {
        SlotAllocator {
            words: vec![0; (slot_count as usize).div_ceil(64)],
            slot_count,
            free: slot_count,
            cursor: 0,
            extra: std::collections::HashMap::new(),
        }
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    pub fn free_count(&self) -> u32 {
        self.free
    }

    pub fn is_used(&self, slot: u32) -> bool {
        self.words[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    /// Marks a slot used during recovery. Returns false if it already was (a double mapping).
    pub fn mark_used(&mut self, slot: u32) -> bool {
        assert!(slot < self.slot_count);
        if self.is_used(slot) {
            return false;
        }
        self.words[(slot / 64) as usize] |= 1 << (slot % 64);
        self.free -= 1;
        true
    }

    pub fn allocate(&mut self) -> Option<u32> {
        if self.free == 0 {
            return None;
        }
        let word_count = self.words.len();
        let mut index = (self.cursor / 64) as usize;
        for _ in 0..=word_count {
            let word = self.words[index];
            if word != u64::MAX {
                // Skip bits below the cursor in its own word only on the first visit.
                let mut candidates = !word;
                if index == (self.cursor / 64) as usize {
                    let low = self.cursor % 64;
                    let masked = candidates & (u64::MAX << low);
                    if masked != 0 {
                        candidates = masked;
                    }
                }
                let bit = candidates.trailing_zeros();
                let slot = index as u32 * 64 + bit;
                if slot < self.slot_count {
                    self.words[index] |= 1 << bit;
                    self.free -= 1;
                    self.cursor = if slot + 1 == self.slot_count {
                        0
                    } else {
                        slot + 1
                    };
                    return Some(slot);
                }
            }
            index = (index + 1) % word_count;
        }
        None
    }

    /// One more volume maps a used slot.
    pub fn share(&mut self, slot: u32) {
        assert!(self.is_used(slot), "slot {slot} shared while free");
        *self.extra.entry(slot).or_insert(0) += 1;
    }

    /// How many volumes map `slot` (0 when free).
    pub fn references(&self, slot: u32) -> u32 {
        if !self.is_used(slot) {
            return 0;
        }
        1 + self.extra.get(&slot).copied().unwrap_or(0)
    }

    /// Drops one reference; the slot is free after its last.
    pub fn release(&mut self, slot: u32) {
        assert!(slot < self.slot_count);
        assert!(self.is_used(slot), "slot {slot} released twice");
        if let Some(n) = self.extra.get_mut(&slot) {
            *n -= 1;
            if *n == 0 {
                self.extra.remove(&slot);
            }
            return;
        }
        self.words[(slot / 64) as usize] &= !(1 << (slot % 64));
        self.free += 1;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_shared_slot_is_freed_with_its_last_reference() {
        let mut a = super::SlotAllocator::new(8);
        let s = a.allocate().unwrap();
        a.share(s);
        a.share(s);
        assert_eq!(a.references(s), 3);
        a.release(s);
        a.release(s);
        assert!(a.is_used(s));
        assert_eq!(a.free_count(), 7);
        a.release(s);
        assert!(!a.is_used(s));
        assert_eq!(a.free_count(), 8);
    }

    use super::*;

    #[test]
    fn allocates_consecutively_then_wraps_to_freed_slots() {
        let mut a = SlotAllocator::new(130);
        let got: Vec<u32> = (0..130).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, (0..130).collect::<Vec<_>>());
        assert_eq!(a.allocate(), None);
        a.release(5);
        a.release(129);
        assert_eq!(a.free_count(), 2);
        let mut again = vec![a.allocate().unwrap(), a.allocate().unwrap()];
        again.sort();
        assert_eq!(again, vec![5, 129]);
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn recovery_marks_are_counted_and_doubles_detected() {
        let mut a = SlotAllocator::new(100);
        assert!(a.mark_used(7));
        assert!(!a.mark_used(7));
        assert_eq!(a.free_count(), 99);
        for _ in 0..99 {
            assert_ne!(a.allocate(), Some(7));
        }
        assert_eq!(a.allocate(), None);
    }
}
