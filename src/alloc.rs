//! A counting global allocator.
//!
//! Rhai's size limits are checked per value and after the fact, so they do not
//! bound the memory a script can take (`m[k] = v` in a loop never trips the map
//! limit). Every allocation made by this extension goes through `Counting`,
//! which keeps a per-thread balance of bytes allocated minus bytes freed while a
//! meter is running. The sandbox reads that balance from its progress callback
//! and stops the script once it passes the limit.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    // `const` thread locals have no lazy initialisation and no destructor, so
    // touching them from inside the allocator cannot recurse into it.
    static METERING: Cell<bool> = const { Cell::new(false) };
    static BALANCE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

#[inline(always)]
fn record(delta: isize) {
    // `try_with` because the allocator may run while the thread is torn down.
    let _ = METERING.try_with(|on| {
        if on.get() {
            let _ = BALANCE.try_with(|b| {
                let now = b.get() + delta;
                b.set(now);
                let _ = PEAK.try_with(|p| {
                    if now > p.get() {
                        p.set(now)
                    }
                });
            });
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size() as isize);
        mimalloc::MiMalloc.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size() as isize);
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(-(layout.size() as isize));
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size as isize - layout.size() as isize);
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

/// Measures the memory one decision takes on the current thread.
pub struct Meter {
    previous: bool,
}

impl Meter {
    pub fn start() -> Self {
        BALANCE.with(|b| b.set(0));
        PEAK.with(|p| p.set(0));
        Meter { previous: METERING.with(|m| m.replace(true)) }
    }

    /// Bytes allocated and not yet freed since the meter started.
    #[inline]
    pub fn live() -> isize {
        BALANCE.with(|b| b.get())
    }

    /// The highest value `live()` reached since the meter started.
    pub fn peak() -> isize {
        PEAK.with(|p| p.get())
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        METERING.with(|m| m.set(self.previous));
    }
}
