//! Decimal output for the trace and decision writers, without the `core::fmt` machinery.
//! Used by `sim.rs` and `replay.rs`; a crate that includes either includes this too
//! (`#[path = "support/decimal.rs"] mod decimal;`).

#![allow(unreachable_pub)]

/// Appends `v` in decimal.
pub fn push_u64(out: &mut String, mut v: u64) {
    let mut buf = [0_u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &d in &buf[at..] {
        out.push(char::from(d));
    }
}
