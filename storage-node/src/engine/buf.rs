//! Block-aligned I/O buffers.
//!
//! O_DIRECT needs the memory, the offset and the length aligned to the device's
//! logical block size; we align everything to 4 KiB. Buffers taken from the
//! io_uring engine's registered set carry their slot index so the engine can use
//! the fixed-buffer opcodes, and go back to the set when dropped.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

pub const ALIGN: usize = 4096;

/// An owned, 4 KiB-aligned byte buffer that may be lent to the kernel.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    /// Set when the memory belongs to a registered slot.
    registered: Option<(u16, Arc<RegisteredSlots>)>,
}

// SAFETY: the buffer owns its memory exclusively; it is a plain byte allocation.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed heap buffer of `len` bytes (rounded up to the alignment inside).
    pub fn zeroed(len: usize) -> Self {
        let capacity = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(capacity, ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            capacity,
            registered: None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changes the visible length within the capacity (contents are kept).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "AlignedBuf::set_len past capacity");
        self.len = len;
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The registered-buffer index, when this buffer is one of the engine's slots.
    pub fn registered_index(&self) -> Option<u16> {
        self.registered.as_ref().map(|(i, _)| *i)
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` bytes and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.registered.take() {
            Some((index, slots)) => slots.put_back(index),
            None => {
                let layout = Layout::from_size_align(self.capacity, ALIGN).expect("valid layout");
                // SAFETY: allocated in `zeroed` with this layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) }
            }
        }
    }
}

/// A fixed set of equally sized buffers registered with io_uring once, so the
/// kernel does not pin and unpin pages on every request.
pub struct RegisteredSlots {
    memory: NonNull<u8>,
    slot_size: usize,
    count: usize,
    /// Registered-buffer index of the first slot, when several sets are
    /// registered with one ring.
    base: u16,
    free: Mutex<Vec<u16>>,
}

// SAFETY: the slot memory is only touched through AlignedBufs, each owning one slot.
unsafe impl Send for RegisteredSlots {}
unsafe impl Sync for RegisteredSlots {}

impl RegisteredSlots {
    pub fn new(slot_size: usize, count: usize) -> Arc<Self> {
        Self::with_base(slot_size, count, 0)
    }

    /// Slots whose registered indices start at `base` (after another set's).
    pub fn with_base(slot_size: usize, count: usize, base: u16) -> Arc<Self> {
        assert!(slot_size % ALIGN == 0 && count > 0 && base as usize + count <= u16::MAX as usize);
        let layout = Layout::from_size_align(slot_size * count, ALIGN).expect("valid layout");
        // SAFETY: non-zero size.
        let memory = unsafe { alloc_zeroed(layout) };
        let memory = NonNull::new(memory).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arc::new(RegisteredSlots {
            memory,
            slot_size,
            count,
            base,
            free: Mutex::new((0..count as u16).rev().collect()),
        })
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The iovecs to register with the ring, one per slot.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // SAFETY: within the allocation.
                iov_base: unsafe { self.memory.as_ptr().add(i * self.slot_size) } as *mut _,
                iov_len: self.slot_size,
            })
            .collect()
    }

    /// A slot of at least `len` bytes, zeroed, or None when all are lent out or
    /// `len` is larger than a slot.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        self.take_with(len, true)
    }

    /// A slot of at least `len` bytes, zeroed when `zero` is set; otherwise
    /// left as its last user wrote it, for a caller that overwrites all of it.
    /// (The memory was zeroed once at allocation, so it is always initialised.)
    pub fn take_with(self: &Arc<Self>, len: usize, zero: bool) -> Option<AlignedBuf> {
        if len > self.slot_size {
            return None;
        }
        let index = self.free.lock().expect("slots lock").pop()?;
        // SAFETY: index < count, so the slot lies within the allocation.
        let ptr = unsafe { self.memory.as_ptr().add(index as usize * self.slot_size) };
        if zero {
            // SAFETY: the slot is ours until put_back; zero it so no stale data leaks.
            unsafe { std::ptr::write_bytes(ptr, 0, len.div_ceil(ALIGN) * ALIGN) };
        }
        Some(AlignedBuf {
            ptr: NonNull::new(ptr).expect("non-null"),
            len,
            capacity: self.slot_size,
            registered: Some((self.base + index, Arc::clone(self))),
        })
    }

    /// The registered index of the slot holding all of `[ptr, ptr + len)`.
    pub fn index_of(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let at = (ptr as usize).checked_sub(self.memory.as_ptr() as usize)?;
        let slot = at / self.slot_size;
        (slot < self.count && at % self.slot_size + len <= self.slot_size)
            .then(|| self.base + slot as u16)
    }

    fn put_back(&self, index: u16) {
        self.free
            .lock()
            .expect("slots lock")
            .push(index - self.base);
    }
}

impl Drop for RegisteredSlots {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.slot_size * self.count, ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout; no AlignedBuf outlives us
        // because each holds an Arc to this struct.
        unsafe { dealloc(self.memory.as_ptr(), layout) }
    }
}

/// The buffers an io_uring engine registers: many small slots for block-sized
/// I/O and fewer large ones for big sequential requests. Both sets are
/// registered with every ring of the engine, small first.
pub struct BufferSets {
    small: Arc<RegisteredSlots>,
    large: Arc<RegisteredSlots>,
}

impl BufferSets {
    pub fn new(
        small_size: usize,
        small_count: usize,
        large_size: usize,
        large_count: usize,
    ) -> Arc<Self> {
        Arc::new(BufferSets {
            small: RegisteredSlots::new(small_size, small_count),
            large: RegisteredSlots::with_base(large_size, large_count, small_count as u16),
        })
    }

    pub fn iovecs(&self) -> Vec<libc::iovec> {
        let mut all = self.small.iovecs();
        all.extend(self.large.iovecs());
        all
    }

    /// A registered buffer of `len` bytes from the smallest set that fits,
    /// zeroed when asked; None when none is free or `len` is too large.
    pub fn take(&self, len: usize, zero: bool) -> Option<AlignedBuf> {
        let set = if len <= self.small.slot_size() {
            &self.small
        } else {
            &self.large
        };
        set.take_with(len, zero)
    }

    /// The registered index of the slot holding all of `[ptr, ptr + len)`,
    /// for memory lent out of a slot and shared since (as `Bytes`).
    pub fn index_of(&self, ptr: *const u8, len: usize) -> Option<u16> {
        self.small
            .index_of(ptr, len)
            .or_else(|| self.large.index_of(ptr, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(5000);
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        assert_eq!(buf.len(), 5000);
        assert_eq!(buf.capacity(), 8192);
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn slots_are_reused_and_zeroed() {
        let slots = RegisteredSlots::new(8192, 2);
        let mut a = slots.take(4096).unwrap();
        a.fill(7);
        let b = slots.take(8192).unwrap();
        assert!(slots.take(10).is_none(), "only two slots");
        assert!(slots.take(9000).is_none());
        let index = a.registered_index();
        drop(a);
        let c = slots.take(4096).unwrap();
        assert_eq!(c.registered_index(), index);
        assert!(c.iter().all(|x| *x == 0));
        drop((b, c));
    }

    #[test]
    fn buffer_sets_pick_the_smallest_fit_with_distinct_indices() {
        let sets = BufferSets::new(8192, 2, 65536, 2);
        assert_eq!(sets.iovecs().len(), 4);
        let small = sets.take(4096, true).unwrap();
        let large = sets.take(10_000, true).unwrap();
        assert_eq!(small.capacity(), 8192);
        assert_eq!(large.capacity(), 65536);
        assert!(small.registered_index().unwrap() < 2);
        assert!(large.registered_index().unwrap() >= 2);
        assert!(sets.take(65537, true).is_none());
        let index = large.registered_index();
        drop(large);
        let again = sets.take(65536, false).unwrap();
        assert_eq!(again.registered_index(), index, "returned to its own set");
        // Memory of a slot, shared on: its index is found from the pointer.
        let shared = bytes::Bytes::from_owner(again);
        assert_eq!(sets.index_of(shared.as_ptr(), shared.len()), index);
        assert_eq!(sets.index_of(shared[4096..].as_ptr(), 4096), index);
        assert_eq!(sets.index_of(shared.as_ptr(), 65537), None, "past its slot");
        let heap = AlignedBuf::zeroed(4096);
        assert_eq!(sets.index_of(heap.as_ptr(), 4096), None);
        drop((small, shared));
    }
}
