//! Reading the wire's fields: big-endian integers, LSNs, length-prefixed
//! and NUL-terminated strings, each checked against what is left, so a
//! short or forged message is an error that names the field, never a panic.

use bytes::{Buf, Bytes};

use super::DecodeError;
use crate::lsn::Lsn;

pub(super) fn non_negative(value: i32, what: &'static str) -> Result<usize, DecodeError> {
    usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
        what,
        value: i64::from(value),
    })
}

pub(super) fn need(r: &Bytes, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if r.remaining() < n {
        Err(DecodeError::Truncated {
            what,
            needed: n,
            available: r.remaining(),
        })
    } else {
        Ok(())
    }
}

/// A reader for each big-endian integer type the protocol uses, named
/// after it (`read_u8`, ...): the field's width checked, then read.
macro_rules! read_ints {
    ($($name:ident: $t:ty => $get:ident),*) => {$(
        pub(super) fn $name(r: &mut Bytes, what: &'static str) -> Result<$t, DecodeError> {
            need(r, std::mem::size_of::<$t>(), what)?;
            Ok(r.$get())
        }
    )*};
}

read_ints!(
    read_u8: u8 => get_u8,
    read_i16: i16 => get_i16,
    read_u32: u32 => get_u32,
    read_i32: i32 => get_i32,
    read_u64: u64 => get_u64,
    read_i64: i64 => get_i64
);

pub(super) fn read_lsn(r: &mut Bytes, what: &'static str) -> Result<Lsn, DecodeError> {
    read_u64(r, what).map(Lsn)
}

pub(super) fn read_len_prefixed(r: &mut Bytes, what: &'static str) -> Result<Bytes, DecodeError> {
    let len = read_i32(r, "value length")?;
    let len = non_negative(len, "value length")?;
    need(r, len, what)?;
    Ok(r.split_to(len))
}

pub(super) fn read_cstr(r: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    let end = r
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::UnterminatedString { what })?;
    let s = r.split_to(end);
    r.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { what })
}
