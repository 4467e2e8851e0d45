//! The per-decision context: what the variable resolver, the progress callback
//! and the helpers need while one decision runs on this thread.
//!
//! Rhai calls these hooks without a user argument, so the context lives in a
//! thread local, installed by `Session::enter` and removed when the session is
//! dropped. Borrows of it are kept short and never span a call back into the
//! script, because that call re-enters the progress callback.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rhai::{Dynamic, ImmutableString, INT};

use crate::alloc::Meter;
use crate::limits::Limits;
use crate::native::NativeTable;
use crate::state::StateData;

/// Which sandbox limit stopped the decision, when one did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tripped {
    Timeout,
    Operations,
    Memory,
    /// A helper that must not fail was asked to build a value over the size
    /// limits (see `helpers::safety`).
    Data,
}

impl Tripped {
    pub fn token(self) -> &'static str {
        match self {
            Tripped::Timeout => "rbee:timeout",
            Tripped::Operations => "rbee:operations",
            Tripped::Memory => "rbee:memory",
            Tripped::Data => "rbee:data",
        }
    }
}

/// Round-robin counters of one policy, one per distinct set of worker ids.
pub type Rotation = Arc<Mutex<HashMap<u64, u64>>>;

pub struct Context {
    pub state: Arc<StateData>,
    pub job_id: ImmutableString,
    pub workers: Dynamic,
    pub now_ms: INT,
    /// The job's `max_tokens`, for workers' `estimated_time`; `None` outside
    /// a decision (`evaluate`).
    pub max_tokens: Option<rhai::FLOAT>,
    pub logs: Vec<String>,
    pub dropped_logs: usize,
    pub rng: u64,
    pub rotation: Rotation,
    pub natives: Arc<NativeTable>,
    pub limits: Limits,
    pub deadline: Instant,
    pub operations: u64,
    pub tripped: Option<Tripped>,
    /// Where the script was last seen (line, column), for limit errors:
    /// Rhai reports those at the outermost call, which is no position.
    pub at: rhai::Position,
}

thread_local! {
    static CURRENT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Runs `f` with the current context, or returns `None` outside a decision.
#[inline]
pub fn with<T>(f: impl FnOnce(&mut Context) -> T) -> Option<T> {
    CURRENT.with(|c| c.borrow_mut().as_mut().map(f))
}

/// Installs a context for the lifetime of the session; the memory meter runs
/// for the same span.
pub struct Session {
    _meter: Meter,
}

impl Session {
    pub fn enter(ctx: Context) -> Self {
        CURRENT.with(|c| *c.borrow_mut() = Some(ctx));
        Session { _meter: Meter::start() }
    }

    /// Ends the session and hands back the context (logs, counters).
    pub fn finish(self) -> Context {
        CURRENT.with(|c| c.borrow_mut().take()).expect("context installed by enter")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// How often (in operations) the wall clock is read: `Instant::now` costs
/// about 20 ns, so reading it every operation would add 2% to a tight loop.
const CLOCK_EVERY: u64 = 16;

/// The progress callback: counts operations (including those of closures run
/// by native helpers, which Rhai does not add back) and checks every limit.
/// Once a limit trips it stays tripped, so a native helper that swallows the
/// error of a closure (as `sort` does) still stops at the next operation.
pub fn progress() -> Option<Dynamic> {
    with(|c| {
        if let Some(t) = c.tripped {
            return Some(Dynamic::from(t.token()));
        }
        c.operations += 1;
        let tripped = if c.operations > c.limits.max_operations {
            Some(Tripped::Operations)
        } else if Meter::live() > c.limits.memory_bytes as isize {
            Some(Tripped::Memory)
        } else if c.operations % CLOCK_EVERY == 0 && Instant::now() >= c.deadline {
            Some(Tripped::Timeout)
        } else {
            None
        };
        c.tripped = tripped;
        tripped.map(|t| Dynamic::from(t.token()))
    })
    .flatten()
}

/// Notes where the script is (the debugger hook calls this per expression).
#[inline]
pub fn note_position(pos: rhai::Position) {
    if !pos.is_none() {
        with(|c| c.at = pos);
    }
}

/// Charges `n` operations for work a native helper did in place of script
/// code, and reports whether the decision may go on.
pub fn charge(n: u64) -> Result<(), Tripped> {
    with(|c| {
        if let Some(t) = c.tripped {
            return Err(t);
        }
        c.operations += n;
        if c.operations > c.limits.max_operations {
            c.tripped = Some(Tripped::Operations);
        } else if Meter::live() > c.limits.memory_bytes as isize {
            c.tripped = Some(Tripped::Memory);
        } else if Instant::now() >= c.deadline {
            c.tripped = Some(Tripped::Timeout);
        }
        c.tripped.map_or(Ok(()), Err)
    })
    .unwrap_or(Ok(()))
}

/// Stops the decision at its next operation, for a helper that cannot report
/// the error itself.
pub fn trip(t: Tripped) {
    with(|c| {
        c.tripped.get_or_insert(t);
    });
}

pub fn log(line: &str) {
    with(|c| {
        if c.logs.len() >= c.limits.max_log_lines {
            c.dropped_logs += 1;
            return;
        }
        let max = c.limits.max_log_line_bytes;
        let mut text = line.to_string();
        if text.len() > max {
            let mut cut = max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        c.logs.push(text);
    });
}

/// The next pseudo-random number of this decision (splitmix64, seeded from the
/// job id, so the same job always draws the same sequence).
pub fn next_random() -> u64 {
    with(|c| {
        c.rng = c.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(c.rng)
    })
    .unwrap_or(0)
}

pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: stable across platforms and releases, unlike std's hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}
