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

/// Asks the CPU to start loading every 64-byte line that the `len` bytes at `addr` touch
/// (a write hint where the target has one, else a read hint), without waiting. A no-op on
/// targets other than x86-64 with SSE (the only ones this crate prefetches on today).
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn prefetch(addr: *const u8, len: usize) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        let (lead, lines) = line_span(addr as usize, len);
        let first = addr.wrapping_sub(lead);
        for i in 0..lines {
            // SAFETY: this block is compiled only where SSE is enabled, and a prefetch never
            // faults and has no effect on memory contents, whatever the address
            // (`wrapping_add` keeps the pointer arithmetic itself defined).
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(first.wrapping_add(i * 64).cast::<i8>()) };
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = (addr, len);
}

/// `(offset of addr into its 64-byte line, lines touched by the len bytes at addr)`: counted
/// from the start of the first line, so that an unaligned range's last line is fetched too
/// (a 384-byte slot 16 bytes into a line touches seven lines).
#[cfg_attr(
    not(all(target_arch = "x86_64", target_feature = "sse")),
    allow(dead_code)
)]
fn line_span(addr: usize, len: usize) -> (usize, usize) {
    let lead = addr & 63;
    if len == 0 {
        return (lead, 0);
    }
    // `i * 64 < lead + len` for every line `i`, so the caller's offsets cannot overflow.
    (lead, len.saturating_add(lead).div_ceil(64))
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

    #[test]
    fn every_line_of_an_unaligned_range_is_covered() {
        assert_eq!(line_span(0, 384), (0, 6));
        assert_eq!(
            line_span(16, 384),
            (16, 7),
            "a slot 16 bytes into a line touches seven lines"
        );
        assert_eq!(line_span(127, 2), (63, 2));
        assert_eq!(line_span(64, 64), (0, 1));
        assert_eq!(line_span(5, 0), (5, 0));
        assert_eq!(line_span(1, usize::MAX).1, usize::MAX / 64 + 1);
    }
}
