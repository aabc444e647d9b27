//! Where the swap queues' backlogs live: a grow-only buffer whose large
//! sizes (1 KiB and up) come from slabs mapped for them alone, not from the
//! allocator's heap.
//!
//! Why: in an arrival storm every queue holds a backlog of announcements
//! for a while, thousands of buffers of 1-2 KiB at once, and the
//! connections admitted meanwhile got their long-lived state (task cells,
//! clients, registrations) from the holes between those buffers. Once the
//! backlog was gone, the allocator could give back no page that held one of
//! them: 5,000 idle connections kept about 1.4 KiB each of the storm's pages
//! resident (docs/results.md, "Memory per idle connection"). With the
//! backlogs in slabs of their own, the heap holds only what lives, and the
//! slabs, all free once every queue is idle, are unmapped by the
//! housekeeping trim after the burst ([`trim`]).
//!
//! A busy queue reuses its two buffers and a freed slot is reused by the
//! next queue that grows, under one short lock: the hot path makes no
//! system call. Each slab holds slots of one size; one whose slots are all
//! free can be carved up again for any size (a storm's queues grow from
//! one size to the next together), and only [`trim`] unmaps it.
//!
//! [`Buffer`] is what the swap queue needs and no more: senders push at the
//! back of one buffer, the receiver swaps it out whole and pops from the
//! front of it, so it never wraps around.

use std::alloc::{self, Layout};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ptr::NonNull;

use parking_lot::Mutex;

/// A queue's buffer: pushes at the back, pops from the front, freed whole.
pub(crate) struct Buffer<T> {
    ptr: NonNull<T>,
    capacity: usize,
    /// Values `head..len` are live.
    head: usize,
    len: usize,
    _owns: PhantomData<T>,
}

// SAFETY: a `Buffer` owns its values as a `Vec` does; the slab it may live
// in is shared only through the pool's lock.
unsafe impl<T: Send> Send for Buffer<T> {}
// SAFETY: `&Buffer` gives no access to the values.
unsafe impl<T: Sync> Sync for Buffer<T> {}

impl<T> Buffer<T> {
    /// An empty buffer; it allocates on its first push.
    pub(crate) const fn new() -> Buffer<T> {
        const { assert!(std::mem::size_of::<T>() != 0, "no zero-sized values") };
        Buffer {
            ptr: NonNull::dangling(),
            capacity: 0,
            head: 0,
            len: 0,
            _owns: PhantomData,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head == self.len
    }

    /// Values the buffer has room for (not counting those already popped).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn push_back(&mut self, value: T) {
        if self.len == self.capacity {
            self.grow();
        }
        // SAFETY: `len < capacity`, and slot `len` holds no live value.
        unsafe { self.ptr.as_ptr().add(self.len).write(value) };
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        if self.is_empty() {
            return None;
        }
        // SAFETY: `head < len`: slot `head` holds a live value, which is
        // moved out and no longer counted as live.
        let value = unsafe { self.ptr.as_ptr().add(self.head).read() };
        self.head += 1;
        if self.head == self.len {
            // Empty again: the room popped from the front is reused.
            self.head = 0;
            self.len = 0;
        }
        Some(value)
    }

    /// Doubles the room (4 values at first, as `VecDeque` and `Vec` start),
    /// moving the live values to the front of the new buffer.
    fn grow(&mut self) {
        let capacity = if self.capacity == 0 {
            4
        } else {
            self.capacity * 2
        };
        let ptr = allocate::<T>(capacity);
        let live = self.len - self.head;
        // SAFETY: both buffers have room for `live` values from these
        // offsets, and they are distinct allocations.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(self.head), ptr.as_ptr(), live);
        }
        // The values were moved: the old buffer holds none now.
        self.head = 0;
        self.len = 0;
        self.free();
        self.ptr = ptr;
        self.capacity = capacity;
        self.len = live;
    }

    /// Frees the room; the caller has dropped or moved out every value.
    fn free(&mut self) {
        if self.capacity != 0 {
            // SAFETY: `ptr` came from `allocate::<T>(capacity)`.
            unsafe { deallocate(self.ptr, self.capacity) };
            self.ptr = NonNull::dangling();
            self.capacity = 0;
        }
    }
}

impl<T> Default for Buffer<T> {
    fn default() -> Buffer<T> {
        Buffer::new()
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        while self.pop_front().is_some() {}
        self.free();
    }
}

impl<T> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &(self.len - self.head))
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Slots of this size and up come from the slabs.
const SMALLEST_SLOT: usize = 1024;
/// One slab: a mapping holding slots of one size. The largest slot.
const SLAB: usize = 64 * 1024;
/// Slot sizes: 1 KiB, 2 KiB, ..., 64 KiB.
const SIZES: usize = (SLAB / SMALLEST_SLOT).trailing_zeros() as usize + 1;

fn layout<T>(capacity: usize) -> Layout {
    match Layout::array::<T>(capacity) {
        Ok(layout) => layout,
        Err(_) => capacity_overflow(),
    }
}

#[cold]
fn capacity_overflow() -> ! {
    // What `Vec` does when a capacity's bytes overflow `isize`.
    panic!("queue buffer capacity overflow")
}

/// The slot size serving `layout`, if a slab does.
fn size_index(layout: Layout) -> Option<usize> {
    let bytes = layout.size();
    if !(SMALLEST_SLOT..=SLAB).contains(&bytes) || layout.align() > SMALLEST_SLOT {
        return None;
    }
    Some((bytes.next_power_of_two() / SMALLEST_SLOT).trailing_zeros() as usize)
}

/// Room for `capacity` values. Out of memory (no slab could be mapped
/// either) aborts, as a `Vec` that cannot grow does.
fn allocate<T>(capacity: usize) -> NonNull<T> {
    let layout = layout::<T>(capacity);
    let ptr = match size_index(layout) {
        Some(size) => POOL.lock().take(size),
        // SAFETY: `layout` has a non-zero size (no zero-sized values, and
        // capacity > 0).
        None => NonNull::new(unsafe { alloc::alloc(layout) }),
    };
    match ptr {
        Some(ptr) => ptr.cast(),
        None => alloc::handle_alloc_error(layout),
    }
}

/// # Safety
///
/// `ptr` came from `allocate::<T>(capacity)` and is not used again.
unsafe fn deallocate<T>(ptr: NonNull<T>, capacity: usize) {
    let layout = layout::<T>(capacity);
    match size_index(layout) {
        Some(size) => POOL.lock().give_back(size, ptr.cast()),
        // SAFETY: allocated by `alloc::alloc` with this layout (the caller's contract).
        None => unsafe { alloc::dealloc(ptr.as_ptr().cast(), layout) },
    }
}

/// The slabs and their free slots.
static POOL: Mutex<Pool> = parking_lot::const_mutex(Pool::new());

/// Every slab, by its address (a multiple of [`SLAB`]).
type Slabs = BTreeMap<usize, Slab>;

struct Pool {
    slabs: Slabs,
    /// For each slot size, the slabs of that size with a free slot but not
    /// wholly free; the last is taken from first.
    partial: [Vec<usize>; SIZES],
    /// Slabs with no slot in use: any size may carve one up again, so a
    /// storm's queues growing from one size to the next reuse the slabs the
    /// smaller size left. [`Pool::trim`] unmaps them.
    empty: Vec<usize>,
}

/// One slab's state.
struct Slab {
    /// Its slot size (an index into the sizes).
    size: usize,
    /// Bit i set: slot i is free (at most 64 slots).
    free: u64,
}

/// All of a slab's slots free.
fn all_free(size: usize) -> u64 {
    let slots = SLAB / (SMALLEST_SLOT << size);
    if slots == 64 {
        u64::MAX
    } else {
        (1 << slots) - 1
    }
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            slabs: BTreeMap::new(),
            partial: [const { Vec::new() }; SIZES],
            empty: Vec::new(),
        }
    }

    fn take(&mut self, size: usize) -> Option<NonNull<u8>> {
        let base = match self.partial[size].last() {
            Some(&base) => base,
            None => {
                let base = match self.empty.pop() {
                    Some(base) => base,
                    None => map_slab()?,
                };
                self.slabs.insert(
                    base,
                    Slab {
                        size,
                        free: all_free(size),
                    },
                );
                self.partial[size].push(base);
                base
            }
        };
        let slab = self.slabs.get_mut(&base)?;
        let slot = slab.free.trailing_zeros() as usize;
        slab.free &= !(1 << slot);
        if slab.free == 0 {
            self.partial[size].pop();
        }
        NonNull::new((base + slot * (SMALLEST_SLOT << size)) as *mut u8)
    }

    fn give_back(&mut self, size: usize, ptr: NonNull<u8>) {
        let addr = ptr.as_ptr() as usize;
        let base = addr - addr % SLAB;
        let Some(slab) = self.slabs.get_mut(&base) else {
            return;
        };
        debug_assert_eq!(slab.size, size, "a slot given back as another size");
        let was_full = slab.free == 0;
        slab.free |= 1 << ((addr - base) / (SMALLEST_SLOT << size));
        if slab.free == all_free(size) {
            // A slab that was full is in no list; one that was partly used
            // leaves its size's list (a rare step: the list is short).
            if !was_full {
                let partial = &mut self.partial[size];
                if let Some(at) = partial.iter().rposition(|&listed| listed == base) {
                    partial.swap_remove(at);
                }
            }
            self.empty.push(base);
        } else if was_full {
            self.partial[size].push(base);
        }
    }

    /// Unmaps every slab none of whose slots is in use; returns the bytes.
    fn trim(&mut self) -> usize {
        let unmapped = self.empty.len() * SLAB;
        for base in self.empty.drain(..) {
            self.slabs.remove(&base);
            unmap_slab(base);
        }
        self.empty.shrink_to_fit();
        for partial in &mut self.partial {
            partial.shrink_to_fit();
        }
        unmapped
    }
}

/// Unmaps every slab that no queue uses; returns the bytes given back to
/// the system. Called by the memory housekeeping after a burst.
pub(crate) fn trim() -> usize {
    POOL.lock().trim()
}

/// Maps a slab at a multiple of [`SLAB`] (so that a slot's slab is its
/// address rounded down): twice the size, then the excess unmapped.
#[cfg(unix)]
fn map_slab() -> Option<usize> {
    // SAFETY: a new private anonymous mapping; no existing memory is touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * SLAB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    let start = addr as usize;
    let base = start.next_multiple_of(SLAB);
    let head = base - start;
    let tail = SLAB - head;
    // SAFETY: the parts of our fresh mapping outside the slab.
    unsafe {
        if head > 0 {
            libc::munmap(start as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((base + SLAB) as *mut libc::c_void, tail);
        }
    }
    Some(base)
}

#[cfg(unix)]
fn unmap_slab(base: usize) {
    // SAFETY: `base` is a slab mapped by `map_slab` none of whose slots is
    // in use, and it is forgotten by the pool.
    unsafe { libc::munmap(base as *mut libc::c_void, SLAB) };
}

#[cfg(not(unix))]
fn map_slab() -> Option<usize> {
    // Elsewhere slabs come from the allocator, aligned to their size.
    let layout = slab_layout()?;
    // SAFETY: a non-zero size.
    let ptr = unsafe { alloc::alloc(layout) };
    (!ptr.is_null()).then_some(ptr as usize)
}

#[cfg(not(unix))]
fn unmap_slab(base: usize) {
    if let Some(layout) = slab_layout() {
        // SAFETY: allocated by `map_slab` with this layout.
        unsafe { alloc::dealloc(base as *mut u8, layout) };
    }
}

#[cfg(not(unix))]
fn slab_layout() -> Option<Layout> {
    Layout::from_size_align(SLAB, SLAB).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn hands_out_in_order_across_growth_and_reuse() {
        let mut buffer = Buffer::new();
        assert_eq!(buffer.capacity(), 0, "allocates on the first push");
        // Far past the smallest slab slot (1 KiB of u64), popping some as
        // it grows, so that growing moves a buffer with a popped front.
        let mut next_out = 0u64;
        for value in 0..5000u64 {
            buffer.push_back(value);
            if value % 3 == 0 {
                assert_eq!(buffer.pop_front(), Some(next_out));
                next_out += 1;
            }
        }
        while let Some(value) = buffer.pop_front() {
            assert_eq!(value, next_out);
            next_out += 1;
        }
        assert_eq!(next_out, 5000);
        assert!(buffer.is_empty());
        // Emptied, it starts again at the front of the same room.
        let capacity = buffer.capacity();
        for value in 0..capacity as u64 {
            buffer.push_back(value);
        }
        assert_eq!(buffer.capacity(), capacity);
    }

    #[test]
    fn drops_every_value_exactly_once() {
        let value = Arc::new(());
        let mut buffer = Buffer::new();
        for _ in 0..300 {
            buffer.push_back(Arc::clone(&value));
        }
        for _ in 0..100 {
            drop(buffer.pop_front());
        }
        assert_eq!(Arc::strong_count(&value), 201);
        drop(buffer);
        assert_eq!(Arc::strong_count(&value), 1);
    }

    #[test]
    fn large_buffers_come_from_slabs_and_small_ones_do_not() {
        let slab_size = |bytes, align| {
            size_index(Layout::from_size_align(bytes, align).unwrap_or_else(|_| unreachable!()))
        };
        assert_eq!(slab_size(512, 8), None);
        assert_eq!(slab_size(1024, 8), Some(0));
        assert_eq!(slab_size(1500, 8), Some(1));
        assert_eq!(slab_size(2048, 8), Some(1));
        assert_eq!(slab_size(SLAB, 8), Some(SIZES - 1));
        assert_eq!(slab_size(SLAB + 8, 8), None);
        assert_eq!(slab_size(4096, 4096), None, "alignment beyond a slot's");
    }

    #[test]
    fn a_wholly_free_slab_serves_any_size_and_trim_unmaps_only_those() {
        // A pool of this test's own: the process-wide one serves the other
        // tests' queues meanwhile.
        let mut pool = Pool::new();
        let per_slab = SLAB / SMALLEST_SLOT;
        let mut slots: Vec<_> = (0..per_slab + 1)
            .map(|_| {
                pool.take(0)
                    .unwrap_or_else(|| unreachable!("mapping failed"))
            })
            .collect();
        let big = pool.take(SIZES - 1).unwrap_or_else(|| unreachable!());
        assert_eq!(pool.slabs.len(), 3);
        // Every slot is distinct, inside its slab, and writable.
        let mut seen: Vec<usize> = slots.iter().map(|slot| slot.as_ptr() as usize).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), per_slab + 1);
        for (i, slot) in slots.iter().enumerate() {
            // SAFETY: a slot of SMALLEST_SLOT bytes, owned by this test.
            unsafe { slot.as_ptr().write_bytes(i as u8, SMALLEST_SLOT) };
        }
        assert_eq!(pool.trim(), 0, "every slab has a slot in use");

        // The lone slot of the second small slab and the big one go back:
        // both slabs are empty, and a 2 KiB slot reuses one, unmapping none.
        pool.give_back(SIZES - 1, big);
        let lone = slots.pop().unwrap_or_else(|| unreachable!());
        pool.give_back(0, lone);
        assert_eq!(pool.empty.len(), 2);
        let reused = pool.take(1).unwrap_or_else(|| unreachable!());
        assert_eq!(pool.slabs.len(), 3, "no new mapping");
        assert_eq!(pool.empty.len(), 1);
        assert_eq!(pool.trim(), SLAB);
        assert_eq!(pool.slabs.len(), 2);

        // The first small slab, full, then partly and wholly free.
        pool.give_back(0, slots[0]);
        assert_eq!(pool.partial[0].len(), 1, "listed once it has a free slot");
        assert_eq!(pool.take(0), Some(slots[0]), "its free slot is taken first");
        for &slot in &slots {
            pool.give_back(0, slot);
        }
        assert!(pool.partial[0].is_empty(), "wholly free: no longer listed");
        pool.give_back(1, reused);
        assert_eq!(pool.trim(), 2 * SLAB);
        assert!(pool.slabs.is_empty());
        assert_eq!(pool.trim(), 0);
    }
}
