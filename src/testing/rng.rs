//! xorshift64*: reproducible randomness without a dependency.

use std::time::Duration;

#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// The same sequence on every run.
    pub fn seeded(seed: u64) -> Rng {
        // Zero is xorshift's one fixed point.
        Rng(seed.max(1))
    }

    /// A seed from `OUTBOX_RELAY_FAULT_SEED`, else from the clock; printed
    /// with the test's name so a failure can be replayed.
    pub fn for_test(test: &str) -> Rng {
        let seed = match std::env::var("OUTBOX_RELAY_FAULT_SEED") {
            Ok(v) => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("OUTBOX_RELAY_FAULT_SEED={v:?} is not a whole number")),
            Err(_) => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            }
        };
        eprintln!("{test}: seed {seed} (OUTBOX_RELAY_FAULT_SEED={seed} replays it)");
        Rng::seeded(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for tests (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index into a slice of `n` elements.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// A duration from `from` to `to` milliseconds, both included.
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}
