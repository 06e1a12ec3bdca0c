//! The process's memory allocator: mimalloc, asked through its plain entry
//! points whenever those already give the alignment Rust asks for.
//!
//! The `mimalloc` crate's `MiMalloc` sends every request through
//! `mi_malloc_aligned`. In mimalloc 3 that is as fast as `mi_malloc` only for
//! blocks of at most 1 KiB; a larger block whose size is not a power of two
//! takes the over-allocating path even when it asks for nothing beyond the
//! 8 bytes every mimalloc block has (a request's boxed pipeline future, an
//! HTTP/2 stream's task, a grown buffer). Under callgrind that path was
//! about 950 instructions of an HTTP/2 request's 45,700. Every mimalloc
//! block is aligned to the machine word (its size classes are whole words),
//! so requests aligned to at most that go to `mi_malloc` and friends, and the
//! rest (tokio's cache-line-aligned tasks) keep the aligned entry points.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment every mimalloc block has: its size classes are whole
/// machine words and its pages start at least 16-byte aligned.
const WORD_ALIGNED: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (see the module comment).
pub struct Mimalloc;

// SAFETY: every method forwards to mimalloc, which returns blocks of at
// least the requested size and alignment (word alignment for the plain entry
// points, used only when the layout asks for no more), or null when out of
// memory; `dealloc` and `realloc` get only pointers mimalloc handed out.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions accept any size.
        unsafe {
            if layout.align() <= WORD_ALIGNED {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if layout.align() <= WORD_ALIGNED {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract),
        // and mimalloc frees aligned and plain blocks alike.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; a block moved
        // by `mi_realloc` keeps word alignment, all that such a layout needs.
        unsafe {
            if layout.align() <= WORD_ALIGNED {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to a few pages, and some large ones, in every alignment
    /// up to a cache line: the block is aligned as asked, usable for its whole
    /// size, zeroed when asked, and keeps its bytes when it grows.
    #[test]
    fn blocks_have_the_alignment_and_size_asked_for() {
        let sizes =
            (1..=2048)
                .chain((2049..=9000).step_by(7))
                .chain([16_384, 65_536, 1 << 20, 3 << 20]);
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 128] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: the layout has a non-zero size; every block is freed
                // with the layout it was allocated with.
                unsafe {
                    let block = Mimalloc.alloc(layout);
                    assert!(!block.is_null(), "{size} bytes aligned {align}");
                    assert_eq!(block as usize % align, 0, "{size} bytes aligned {align}");
                    block.write_bytes(0xA5, size);
                    let grown = Mimalloc.realloc(block, layout, size * 2 + 8);
                    assert!(!grown.is_null());
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "{size} bytes regrown, aligned {align}"
                    );
                    assert!(
                        std::slice::from_raw_parts(grown, size)
                            .iter()
                            .all(|&b| b == 0xA5)
                    );
                    Mimalloc.dealloc(
                        grown,
                        Layout::from_size_align_unchecked(size * 2 + 8, align),
                    );

                    let zeroed = Mimalloc.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0);
                    assert!(
                        std::slice::from_raw_parts(zeroed, size)
                            .iter()
                            .all(|&b| b == 0)
                    );
                    Mimalloc.dealloc(zeroed, layout);
                }
            }
        }
    }
}
