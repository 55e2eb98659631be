//! Rate limiting of failed enrollment attempts: a token bucket per source address and one for
//! the whole coordinator. Time is a parameter (ms), so the limiter is tested without sleeping.
//!
//! Only failures spend from the buckets; a refused attempt that arrives while a bucket is
//! empty is not even checked against the tokens (and does not refill it).

use std::collections::HashMap;
use std::net::IpAddr;

/// How many failures a bucket holds and how fast it refills.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Failures allowed in a burst.
    pub burst: u32,
    /// Milliseconds for one failure to be forgiven.
    pub refill_ms: u64,
}

/// Per-address: 5 failures, then one more every 12 s (5 a minute). Whole coordinator: 30,
/// then one every 2 s.
pub const PER_SOURCE: Rate = Rate {
    burst: 5,
    refill_ms: 12_000,
};
pub const GLOBAL: Rate = Rate {
    burst: 30,
    refill_ms: 2_000,
};

/// Addresses tracked at most; past it, full buckets are forgotten first.
const MAX_SOURCES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Failures still allowed, in thousandths (integer arithmetic keeps it exact).
    milli: u64,
    last_ms: u64,
}

impl Bucket {
    fn full(rate: Rate, now: u64) -> Self {
        Self {
            milli: u64::from(rate.burst) * 1000,
            last_ms: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: u64) {
        let elapsed = now.saturating_sub(self.last_ms);
        let add = elapsed.saturating_mul(1000) / rate.refill_ms.max(1);
        self.milli = (self.milli + add).min(u64::from(rate.burst) * 1000);
        self.last_ms = now.max(self.last_ms);
    }

    /// Milliseconds until one failure is allowed again (0: now).
    fn wait_ms(&self, rate: Rate) -> u64 {
        if self.milli >= 1000 {
            0
        } else {
            (1000 - self.milli) * rate.refill_ms.max(1) / 1000
        }
    }
}

/// Which limit an attempt ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Source { retry_after_ms: u64 },
    Global { retry_after_ms: u64 },
}

/// The two levels of buckets.
#[derive(Debug)]
pub struct Limiter {
    per_source: Rate,
    global_rate: Rate,
    sources: HashMap<IpAddr, Bucket>,
    global: Bucket,
}

impl Limiter {
    pub fn new(per_source: Rate, global: Rate, now: u64) -> Self {
        Self {
            per_source,
            global_rate: global,
            sources: HashMap::new(),
            global: Bucket::full(global, now),
        }
    }

    /// May an attempt from `source` be checked now?
    pub fn check(&mut self, now: u64, source: IpAddr) -> Result<(), Limited> {
        self.global.refill(self.global_rate, now);
        if let Some(b) = self.sources.get_mut(&source) {
            b.refill(self.per_source, now);
            let wait = b.wait_ms(self.per_source);
            if wait > 0 {
                return Err(Limited::Source {
                    retry_after_ms: wait,
                });
            }
        }
        let wait = self.global.wait_ms(self.global_rate);
        if wait > 0 {
            return Err(Limited::Global {
                retry_after_ms: wait,
            });
        }
        Ok(())
    }

    /// Count a failed attempt from `source`.
    pub fn failed(&mut self, now: u64, source: IpAddr) {
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&source) {
            let rate = self.per_source;
            self.sources.retain(|_, b| {
                b.refill(rate, now);
                b.milli < u64::from(rate.burst) * 1000
            });
        }
        let rate = self.per_source;
        let b = self
            .sources
            .entry(source)
            .or_insert_with(|| Bucket::full(rate, now));
        b.refill(rate, now);
        b.milli = b.milli.saturating_sub(1000);
        self.global.refill(self.global_rate, now);
        self.global.milli = self.global.milli.saturating_sub(1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn per_source_burst_then_refill() {
        let rate = Rate {
            burst: 3,
            refill_ms: 1000,
        };
        let mut l = Limiter::new(rate, GLOBAL, 0);
        for _ in 0..3 {
            assert_eq!(l.check(0, ip(1)), Ok(()));
            l.failed(0, ip(1));
        }
        assert_eq!(
            l.check(0, ip(1)),
            Err(Limited::Source {
                retry_after_ms: 1000
            })
        );
        // Another address is unaffected.
        assert_eq!(l.check(0, ip(2)), Ok(()));
        assert!(l.check(999, ip(1)).is_err());
        assert_eq!(l.check(1000, ip(1)), Ok(()));
        l.failed(1000, ip(1));
        assert!(l.check(1500, ip(1)).is_err());
    }

    #[test]
    fn global_limit_spans_addresses() {
        let global = Rate {
            burst: 4,
            refill_ms: 10_000,
        };
        let mut l = Limiter::new(PER_SOURCE, global, 0);
        for i in 0..4 {
            assert_eq!(l.check(0, ip(i)), Ok(()));
            l.failed(0, ip(i));
        }
        assert_eq!(
            l.check(0, ip(9)),
            Err(Limited::Global {
                retry_after_ms: 10_000
            })
        );
        assert_eq!(l.check(10_000, ip(9)), Ok(()));
    }

    #[test]
    fn clock_going_backwards_does_not_panic_or_refill() {
        let mut l = Limiter::new(
            Rate {
                burst: 1,
                refill_ms: 1000,
            },
            GLOBAL,
            5000,
        );
        l.failed(5000, ip(1));
        assert!(l.check(100, ip(1)).is_err());
    }
}
