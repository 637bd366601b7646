//! One side of a book: price levels kept in a sorted vector with the best level at the end.
//!
//! Most activity happens near the top of the book, so keeping the best level at the end makes
//! the common inserts and removals cheap moves of a few elements, and a sweep pops from the end.
//! Lookups are binary searches over a dense `i64` array, which stays in cache for books of
//! thousands of levels. Bids are keyed by price and asks by negated price, so "ascending key"
//! means "towards the best price" on both sides and one code path serves both.

use crate::types::Side;

/// Sorted price levels of one side.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ladder {
    /// Ascending keys (bids: price; asks: -price); the best level is last.
    keys: Vec<i64>,
    /// Level slab index for each key.
    levels: Vec<u32>,
}

/// The sort key of a price on a side: larger is better.
#[inline]
pub(crate) fn key(side: Side, price: i64) -> i64 {
    match side {
        Side::Buy => price,
        Side::Sell => -price,
    }
}

impl Ladder {
    /// Number of levels.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Level slab index at a position (0 = worst, `len - 1` = best).
    #[inline]
    pub(crate) fn level_at(&self, position: usize) -> u32 {
        self.levels[position]
    }

    /// The best level, if any.
    #[inline]
    pub(crate) fn best(&self) -> Option<u32> {
        self.levels.last().copied()
    }

    /// Position of `key`, or the position where it would be inserted.
    #[inline]
    pub(crate) fn search(&self, key: i64) -> Result<usize, usize> {
        // New levels and cancels cluster near the best price, at the end of the vector: look at
        // the last element first, which settles many lookups in one comparison.
        match self.keys.last() {
            None => return Err(0),
            Some(&last) if key > last => return Err(self.keys.len()),
            Some(&last) if key == last => return Ok(self.keys.len() - 1),
            _ => {}
        }
        self.keys.binary_search(&key)
    }

    /// Inserts a level at the position `search` returned.
    #[inline]
    pub(crate) fn insert(&mut self, position: usize, key: i64, level: u32) {
        self.keys.insert(position, key);
        self.levels.insert(position, level);
    }

    /// Removes the level at a position.
    #[inline]
    pub(crate) fn remove(&mut self, position: usize) {
        if position + 1 == self.keys.len() {
            self.keys.pop();
            self.levels.pop();
        } else {
            self.keys.remove(position);
            self.levels.remove(position);
        }
    }

    /// Level slab indices from best to worst.
    pub(crate) fn iter_best_first(&self) -> impl Iterator<Item = u32> + '_ {
        self.levels.iter().rev().copied()
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.keys.capacity() * 8 + self.levels.capacity() * 4
    }
}
