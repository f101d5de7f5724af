//! For tests only, in the library so that the unit tests (the decoder's and
//! the stream buffer's property tests) and the integration tests share one
//! implementation: reproducible randomness without a dependency
//! (xorshift64*), and the captured pgoutput messages of `tests/fixtures`.
//! Property tests seed the randomness with a constant, so every run tries
//! the same cases; the fault tests seed it from the clock and print the
//! seed, and `OUTBOX_RELAY_FAULT_SEED` replays a run that failed.

mod rng;

pub use rng::Rng;

use bytes::Bytes;

/// The messages of a captured pgoutput fixture (`tests/fixtures/pgoutput_*.txt`:
/// one message in hex per line, `#` comments), in stream order.
pub fn captured(fixture: &str) -> Vec<Bytes> {
    fixture
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Bytes::from(unhex(l)))
        .collect()
}

fn unhex(line: &str) -> Vec<u8> {
    assert_eq!(line.len() % 2, 0, "odd hex length: {line}");
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex digit"))
        .collect()
}
