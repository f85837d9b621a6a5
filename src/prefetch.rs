//! Software prefetch: the crate's only `unsafe` code.
//!
//! On this workload the behavioural layer's time is a chain of dependent cache misses (the
//! table entry, then the subject's slot on another page, then the cross index), and the
//! locked instructions of the shard and slot locks keep ordinary loads from running ahead
//! of them. A prefetch is not held back by them, so a check asks for a subject's slot as
//! soon as it has found the table entry, and for a prompt family's bucket as soon as it
//! knows the family; the misses then overlap each other and the rest of the check
//! (`benches/README.md`, change 13, has the A/B runs).
//!
//! A prefetch is a hint: it never faults, whatever the address, and changes no memory.

/// Asks the CPU to start loading every 64-byte line of the `len` bytes at `addr` into cache,
/// for writing, without waiting. A no-op where the target has no stable prefetch
/// instruction (anything but x86-64 today).
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn prefetch(addr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        let mut off = 0;
        while off < len {
            // SAFETY: SSE is part of the x86-64 baseline, and a prefetch never faults and
            // has no effect on memory contents, whatever the address (`wrapping_add` keeps
            // the pointer arithmetic itself defined).
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(addr.wrapping_add(off).cast::<i8>()) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (addr, len);
}

/// [`prefetch`] of the whole of `*value`.
#[inline(always)]
pub(crate) fn prefetch_value<T>(value: &T) {
    prefetch((value as *const T).cast::<u8>(), std::mem::size_of::<T>());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefetch_of_any_address_is_harmless() {
        // A prefetch must never fault: null, unmapped, misaligned and wrapping addresses.
        prefetch(std::ptr::null(), 256);
        prefetch(usize::MAX as *const u8, 192);
        prefetch(0x10 as *const u8, 1);
        prefetch(std::ptr::null(), 0);
        let v = [7_u64; 100];
        prefetch_value(&v);
        assert_eq!(v.iter().sum::<u64>(), 700, "a prefetch changes no memory");
    }
}
