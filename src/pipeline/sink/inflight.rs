//! Records handed to the producer and not yet reported on, by delivery tag.
//! The one tracker of the pipeline and of `backfill`: tags are handed out in
//! order, reports arrive in any order, so a report empties its slot and the
//! front is trimmed past every emptied one. A slot stays until its report
//! (or the undo of a refused enqueue) comes, so nothing is forgotten.

use std::collections::VecDeque;

#[derive(Debug)]
pub struct InFlight<T> {
    /// The tag of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<T>>,
    live: usize,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            base: 0,
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

impl<T> InFlight<T> {
    /// Tracks `value`; its tag goes with the record to the producer.
    pub fn push(&mut self, value: T) -> u64 {
        let tag = self.base + self.slots.len() as u64;
        self.slots.push_back(Some(value));
        self.live += 1;
        tag
    }

    /// Gives back the newest entry: the enqueue it was pushed for failed,
    /// so no report will come for its tag.
    pub fn undo_push(&mut self) -> Option<T> {
        let v = self.slots.pop_back().flatten();
        if v.is_some() {
            self.live -= 1;
        }
        v
    }

    /// The entry a delivery report is for; `None` for a tag never handed
    /// out or already reported.
    pub fn take(&mut self, tag: u64) -> Option<T> {
        let v = tag
            .checked_sub(self.base)
            .and_then(|i| self.slots.get_mut(usize::try_from(i).ok()?))
            .and_then(Option::take)?;
        self.live -= 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(v)
    }

    /// Entries still owed a report.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Slots from the oldest unreported entry to the newest, reported ones
    /// between them included: what the tracker holds while one record is
    /// stuck.
    pub fn span(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_in_any_order_trim_the_front_and_unknown_tags_are_none() {
        let mut f = InFlight::default();
        let tags: Vec<u64> = (0..4).map(|i| f.push(i * 10)).collect();
        assert_eq!(tags, [0, 1, 2, 3]);
        assert_eq!(f.take(2), Some(20));
        assert_eq!(
            (f.len(), f.span()),
            (3, 4),
            "a hole behind the oldest stays"
        );
        assert_eq!(f.take(2), None, "reported twice");
        assert_eq!(f.take(0), Some(0));
        assert_eq!(f.take(1), Some(10));
        assert_eq!(
            (f.len(), f.span()),
            (1, 1),
            "the front trimmed past the holes"
        );
        assert_eq!(f.push(40), 4);
        assert_eq!(f.undo_push(), Some(40));
        assert_eq!(f.push(50), 4, "an undone tag is handed out again");
        assert_eq!(f.take(99), None);
        assert_eq!(f.take(3), Some(30));
        assert_eq!(f.take(4), Some(50));
        assert!(f.is_empty() && f.span() == 0);
    }
}
