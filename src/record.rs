//! `Rec`: a read-only record of the state (a worker, pool, GPU, model, tenant
//! or queued job).
//!
//! Records are shared between decisions, so they must be cheap to hand out and
//! impossible to change from a script. A plain Rhai map is copied whenever it
//! is passed around, and Rhai refuses shared values inside arrays, so the
//! state stores each entry as an `Arc` behind this custom type. Scripts read
//! it like a map (`w.id`, `w["id"]`, `keys()`, `"id" in w`); `to_map()` gives
//! a mutable copy.
//!
//! The fields helpers read most are also kept in a fixed table, so reading
//! `w.load` is an index instead of a search of the map by name.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FuncRegistration, ImmutableString, Map, NativeCallContext};

use crate::context;
use crate::state::num;

/// Fields with a slot in the table, in slot order.
pub const HOT: &[&str] = &[
    "id",
    "status",
    "load",
    "active",
    "slots",
    "gpus",
    "vram_free",
    "vram_total",
    "cost_per_token",
    "latency_ms",
    "tokens_per_sec",
    "capability",
    "backend",
    "model",
    "models",
    "geo",
    "pool",
    "last_used_at",
    "priority",
];

/// Slots the Rust helpers read directly: each is the position of its name in
/// `HOT` (the helpers' tests fail if they drift apart).
pub const ID: usize = 0;
pub const STATUS: usize = 1;
pub const LOAD: usize = 2;
pub const ACTIVE: usize = 3;
pub const SLOTS: usize = 4;
pub const VRAM_FREE: usize = 6;
pub const LATENCY_MS: usize = 9;
pub const TOKENS_PER_SEC: usize = 10;
pub const LAST_USED_AT: usize = 17;

pub const ESTIMATE: &str = "estimated_time";

/// The slot of a hot field. A `match` rather than a search of `HOT`: it
/// tells most names apart by length alone, and it runs for every field a
/// script reads and every field of every record built.
#[inline]
pub fn hot_slot(key: &str) -> Option<usize> {
    Some(match key {
        "id" => 0,
        "status" => 1,
        "load" => 2,
        "active" => 3,
        "slots" => 4,
        "gpus" => 5,
        "vram_free" => 6,
        "vram_total" => 7,
        "cost_per_token" => 8,
        "latency_ms" => 9,
        "tokens_per_sec" => 10,
        "capability" => 11,
        "backend" => 12,
        "model" => 13,
        "models" => 14,
        "geo" => 15,
        "pool" => 16,
        "last_used_at" => 17,
        "priority" => 18,
        _ => return None,
    })
}

/// The hot fields that change with every job: the slot fields, which the
/// queen sends for every job it starts or ends and the simulator for every
/// one it dispatches or completes, and the speed the queen learns from every
/// answer. A record keeps them apart from the rest, so that such an update
/// makes a record that shares everything else with the one it replaces
/// instead of copying all of the worker's fields (with its `geo` map and its
/// `models` array) into a new one.
pub const VOLATILE: [usize; 6] = [STATUS, LOAD, ACTIVE, LATENCY_MS, TOKENS_PER_SEC, LAST_USED_AT];

/// Whether `key` names a volatile field.
pub fn is_volatile(key: &str) -> bool {
    hot_slot(key).and_then(volatile_index).is_some()
}

#[inline]
fn volatile_index(slot: usize) -> Option<usize> {
    match slot {
        STATUS => Some(0),
        LOAD => Some(1),
        ACTIVE => Some(2),
        LATENCY_MS => Some(3),
        TOKENS_PER_SEC => Some(4),
        LAST_USED_AT => Some(5),
        _ => None,
    }
}

/// A record's volatile fields, indexed by their hot slot.
pub struct VolatileFields([Option<Dynamic>; VOLATILE.len()]);

impl std::ops::Index<usize> for VolatileFields {
    type Output = Option<Dynamic>;
    fn index(&self, slot: usize) -> &Option<Dynamic> {
        &self.0[volatile_index(slot).expect("a volatile slot")]
    }
}

impl std::ops::IndexMut<usize> for VolatileFields {
    fn index_mut(&mut self, slot: usize) -> &mut Option<Dynamic> {
        &mut self.0[volatile_index(slot).expect("a volatile slot")]
    }
}

/// The fields of a record as built. For the volatile fields, `vol` of the
/// record holding it has the current values, not this.
#[derive(Debug)]
struct Base {
    map: Map,
    hot: Box<[Option<Dynamic>]>,
}

#[derive(Debug)]
pub struct RecData {
    base: Arc<Base>,
    vol: [Option<Dynamic>; VOLATILE.len()],
    /// What `estimated_time` needs, read once as numbers and kept here
    /// rather than behind `base` (one pointer fewer to follow per worker in
    /// a filter on it): time to first token, tokens per second (`None` when
    /// not positive: no estimate) and slots; and the `active` count.
    speed: Option<(f64, f64, f64)>,
    active: f64,
}

impl RecData {
    fn new(base: Arc<Base>, vol: [Option<Dynamic>; VOLATILE.len()]) -> Self {
        let get = |slot: usize| match volatile_index(slot) {
            Some(v) => vol[v].as_ref().and_then(num),
            None => base.hot[slot].as_ref().and_then(num),
        };
        let speed = get(TOKENS_PER_SEC)
            .filter(|t| *t > 0.0)
            .map(|tps| (get(LATENCY_MS).unwrap_or(0.0), tps, get(SLOTS).unwrap_or(1.0).max(1.0)));
        let active = get(ACTIVE).unwrap_or(0.0);
        RecData { base, vol, speed, active }
    }
}

#[derive(Clone, Debug)]
pub struct Rec(pub Arc<RecData>);

impl Rec {
    pub fn new(map: Map) -> Self {
        let mut hot: Box<[Option<Dynamic>]> = vec![None; HOT.len()].into_boxed_slice();
        for (key, value) in &map {
            if let Some(slot) = hot_slot(key) {
                hot[slot] = Some(value.clone());
            }
        }
        let vol = VOLATILE.map(|slot| hot[slot].clone());
        Rec(Arc::new(RecData::new(Arc::new(Base { map, hot }), vol)))
    }

    /// The record with volatile fields changed by `edit`, which sees them by
    /// their hot slot (`STATUS`, `LOAD`, `ACTIVE`, `LATENCY_MS`,
    /// `TOKENS_PER_SEC`, `LAST_USED_AT`) and must leave them normalised;
    /// everything else is shared with this one.
    pub fn with_vol(&self, edit: impl FnOnce(&mut VolatileFields)) -> Rec {
        let mut fields = VolatileFields(self.0.vol.clone());
        edit(&mut fields);
        Rec(Arc::new(RecData::new(self.0.base.clone(), fields.0)))
    }

    /// A hot field by slot; `None` when the record does not have it.
    #[inline]
    pub fn slot(&self, slot: usize) -> Option<&Dynamic> {
        match volatile_index(slot) {
            Some(v) => self.0.vol[v].as_ref(),
            None => self.0.base.hot.get(slot).and_then(|v| v.as_ref()),
        }
    }

    /// A field as stored (`estimated_time` only if it is a stored field).
    #[inline]
    pub fn field(&self, key: &str) -> Option<&Dynamic> {
        match hot_slot(key) {
            Some(slot) => self.slot(slot),
            None => self.0.base.map.get(key),
        }
    }

    /// A field by name. `estimated_time` is worked out for the job being
    /// scheduled, when there is one (DESIGN 2.2), so it is never stale.
    pub fn get(&self, key: &str) -> Option<Dynamic> {
        match hot_slot(key) {
            Some(slot) => self.slot(slot).cloned(),
            None => self.get_cold(key),
        }
    }

    /// A field that is not a hot one (the caller knows), without looking
    /// for it among them.
    pub fn get_cold(&self, key: &str) -> Option<Dynamic> {
        if key == ESTIMATE {
            if let Some(e) = self.estimate() {
                return Some(e);
            }
        }
        self.0.base.map.get(key).cloned()
    }

    /// Milliseconds to finish the current job here: queue wait, time to first
    /// token and generation time. The wait is the work ahead: when every slot
    /// is busy, each job beyond the slots costs one service time per slot.
    pub fn estimate(&self) -> Option<Dynamic> {
        let max_tokens = context::with(|c| c.max_tokens).flatten()?;
        self.estimate_for(max_tokens).map(Dynamic::from_float)
    }

    /// `estimate` for a job of `max_tokens`, for a caller that has read it
    /// once for many workers (`native::bind`).
    pub fn estimate_for(&self, max_tokens: f64) -> Option<f64> {
        let (latency, tps, slots) = self.0.speed?;
        let service = latency + max_tokens / tps * 1000.0;
        let ahead = (self.0.active - slots + 1.0).max(0.0);
        Some(ahead * service / slots + service)
    }

    /// The stored fields as one plain map (no `estimated_time` unless stored).
    pub fn fields_map(&self) -> Map {
        let mut m = self.0.base.map.clone();
        for (slot, value) in VOLATILE.iter().zip(&self.0.vol) {
            match value {
                Some(v) => m.insert(HOT[*slot].into(), v.clone()),
                None => m.remove(HOT[*slot]),
            };
        }
        m
    }

    /// A plain map with the same entries, `estimated_time` included.
    pub fn to_map(&self) -> Map {
        let mut m = self.fields_map();
        if let Some(e) = self.estimate() {
            m.insert(ESTIMATE.into(), e);
        }
        m
    }

    fn keys(&self) -> Array {
        let map = self.fields_map();
        // Rhai strings, as a map's keys() gives (not the map's own key type).
        let mut keys: Array =
            map.keys().map(|k| Dynamic::from(ImmutableString::from(k.as_str()))).collect();
        if !map.contains_key(ESTIMATE) && self.estimate().is_some() {
            keys.push(ESTIMATE.into());
        }
        keys
    }
}

/// The stored fields of a record or of a plain map, read alike.
#[derive(Clone, Copy)]
pub enum Fields<'a> {
    Rec(&'a Rec),
    Map(&'a Map),
}

impl<'a> Fields<'a> {
    #[inline]
    pub fn get(&self, key: &str) -> Option<&'a Dynamic> {
        match self {
            Fields::Rec(r) => r.field(key),
            Fields::Map(m) => m.get(key),
        }
    }
}

/// Calls `f` with the fields of a record or a map; `None` for other values.
pub fn with_fields<T>(value: &Dynamic, f: impl FnOnce(Fields<'_>) -> T) -> Option<T> {
    if let Some(r) = value.read_lock::<Rec>() {
        return Some(f(Fields::Rec(&r)));
    }
    value.read_lock::<Map>().map(|m| f(Fields::Map(&m)))
}

pub fn is_record_or_map(value: &Dynamic) -> bool {
    value.is_map() || value.read_lock::<Rec>().is_some()
}

fn display(
    ctx: NativeCallContext,
    r: &mut Rec,
) -> Result<ImmutableString, Box<rhai::EvalAltResult>> {
    ctx.call_native_fn::<ImmutableString>("to_debug", (Dynamic::from_map(r.to_map()),))
}

pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<Rec>("record")
        .register_indexer_get(|r: &mut Rec, key: &str| r.get(key).unwrap_or(Dynamic::UNIT))
        .register_fn("keys", |r: &mut Rec| r.keys())
        .register_fn("values", |r: &mut Rec| {
            r.keys().iter().map(|k| r.get(&k.to_string()).unwrap_or_default()).collect::<Array>()
        })
        .register_fn("len", |r: &mut Rec| r.keys().len() as rhai::INT)
        .register_fn("is_empty", |r: &mut Rec| r.keys().is_empty())
        .register_fn("contains", |r: &mut Rec, key: &str| r.get(key).is_some())
        .register_fn("get", |r: &mut Rec, key: &str| r.get(key).unwrap_or(Dynamic::UNIT))
        .register_fn("to_map", |r: &mut Rec| r.to_map())
        .register_fn("==", |a: &mut Rec, b: Rec| Arc::ptr_eq(&a.0, &b.0))
        .register_fn("!=", |a: &mut Rec, b: Rec| !Arc::ptr_eq(&a.0, &b.0));
    for name in ["to_string", "to_debug", "print", "debug"] {
        FuncRegistration::new(name).register_into_engine(engine, display);
    }
}

/// Whether `hot_slot` answers every name of `HOT` with its position (checked
/// when the module loads, so a field added to one and not the other cannot
/// go unnoticed).
pub fn hot_slots_agree() -> bool {
    HOT.iter().enumerate().all(|(i, key)| hot_slot(key) == Some(i))
}
