//! The storage under a book's order slots: an array that grows by whole chunks and never moves
//! what it already holds.
//!
//! A `Vec` doubles when it fills, copying every element into a new allocation and touching
//! twice the memory. For a book of a million orders that is a copy of some 60 MB, plus the
//! first touch of 120 MB of fresh pages, inside one placement: every command queued behind it
//! waits. Here a full array only gains another chunk of [`CHUNK`] slots, so the worst
//! placement costs one chunk's allocation, and slots never change address.

use std::ops::{Index, IndexMut};

/// log2 of [`CHUNK`].
const CHUNK_BITS: u32 = 12;
/// Slots per chunk: 4,096 orders of 120 bytes, 480 KiB.
pub(crate) const CHUNK: usize = 1 << CHUNK_BITS;
const MASK: usize = CHUNK - 1;

/// A growable array in chunks of [`CHUNK`] elements.
#[derive(Clone, Debug)]
pub(crate) struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    /// Appends `value` and returns its index.
    #[inline]
    pub(crate) fn push(&mut self, value: T) -> usize {
        let index = self.len;
        if index & MASK == 0 {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        // The chunk was just added when the last one was full, so it is always there.
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(value);
        }
        self.len += 1;
        index
    }

    /// Every element, in index order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flatten()
    }

    /// Bytes allocated, spare slots of the last chunk included.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.chunks.len() * CHUNK * std::mem::size_of::<T>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<T>>()
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;

    #[inline]
    fn index(&self, index: usize) -> &T {
        &self.chunks[index >> CHUNK_BITS][index & MASK]
    }
}

impl<T> IndexMut<usize> for Chunked<T> {
    #[inline]
    fn index_mut(&mut self, index: usize) -> &mut T {
        &mut self.chunks[index >> CHUNK_BITS][index & MASK]
    }
}

#[cfg(test)]
mod tests {
    use super::{CHUNK, Chunked};

    #[test]
    fn indexes_across_chunks_and_never_moves_an_element() {
        let mut slab = Chunked::default();
        for i in 0..CHUNK * 2 + 3 {
            assert_eq!(slab.push(i), i);
        }
        let first: *const usize = &slab[0];
        for i in 0..CHUNK * 3 {
            slab.push(i);
        }
        assert!(std::ptr::eq(first, &slab[0]), "the first element moved");
        assert_eq!(slab[CHUNK], CHUNK);
        assert_eq!(slab[CHUNK * 2 + 2], CHUNK * 2 + 2);
        slab[CHUNK + 1] = 7;
        assert_eq!(slab[CHUNK + 1], 7);
        assert_eq!(slab.iter().count(), CHUNK * 5 + 3);
        assert_eq!(slab.iter().nth(CHUNK * 2 + 2), Some(&(CHUNK * 2 + 2)));
    }

    #[test]
    #[should_panic]
    fn an_index_past_the_end_panics_like_a_vec() {
        let mut slab = Chunked::default();
        slab.push(1_u8);
        let _ = slab[CHUNK - 1];
    }
}
