//! Free-slot bitmap of one core's region.
//!
//! Slots are handed out next-fit from a cursor, so a stream of writes (random or not) lands on
//! consecutive slots and the disk sees sequential writes. A slot freed by an overwrite is not
//! reusable until the mapping that replaced it is durable: the store keeps such slots on a
//! pending list and calls `release` only after the journal commit that records the change.

pub struct SlotAllocator {
    words: Vec<u64>,
    slot_count: u32,
    free: u32,
    cursor: u32,
}

impl SlotAllocator {
    /// All slots free.
    pub fn new(slot_count: u32) -> SlotAllocator {
        SlotAllocator {
            words: vec![0; (slot_count as usize).div_ceil(64)],
            slot_count,
            free: slot_count,
            cursor: 0,
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

    pub fn release(&mut self, slot: u32) {
        assert!(slot < self.slot_count);
        assert!(self.is_used(slot), "slot {slot} released twice");
        self.words[(slot / 64) as usize] &= !(1 << (slot % 64));
        self.free += 1;
    }
}

#[cfg(test)]
mod tests {
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
