//! `Rec`: a read-only record of the state (a worker, pool, GPU, model, tenant
//! or queued job).
//!
//! Records are shared between decisions, so they must be cheap to hand out and
//! impossible to change from a script. A plain Rhai map is copied whenever it
//! is passed around, and Rhai refuses shared values inside arrays, so the
//! state stores each entry as an `Arc<Map>` behind this custom type. Scripts
//! read it like a map (`w.id`, `w["id"]`, `keys()`, `"id" in w`); `to_map()`
//! gives a mutable copy.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FuncRegistration, ImmutableString, Map, NativeCallContext};

#[derive(Clone, Debug)]
pub struct Rec {
    pub map: Arc<Map>,
    /// `estimated_time` for the job being scheduled (DESIGN 2.2): it differs
    /// per job, so it lives beside the shared map instead of in it.
    pub estimate: Option<Dynamic>,
}

pub const ESTIMATE: &str = "estimated_time";

impl Rec {
    pub fn new(map: Map) -> Self {
        Rec { map: Arc::new(map), estimate: None }
    }

    pub fn get(&self, key: &str) -> Option<&Dynamic> {
        match (&self.estimate, key) {
            (Some(e), ESTIMATE) => Some(e),
            _ => self.map.get(key),
        }
    }

    /// A plain map with the same entries.
    pub fn to_map(&self) -> Map {
        let mut m = (*self.map).clone();
        if let Some(e) = &self.estimate {
            m.insert(ESTIMATE.into(), e.clone());
        }
        m
    }

    fn keys(&self) -> Array {
        let mut keys: Array = self.map.keys().map(|k| Dynamic::from(k.clone())).collect();
        if self.estimate.is_some() && !self.map.contains_key(ESTIMATE) {
            keys.push(ESTIMATE.into());
        }
        keys
    }
}

/// Calls `f` with the entries of a record or a map; `None` for other values.
pub fn with_map<T>(value: &Dynamic, f: impl FnOnce(&Map) -> T) -> Option<T> {
    if let Some(r) = value.read_lock::<Rec>() {
        if r.estimate.is_none() {
            return Some(f(&r.map));
        }
        return Some(f(&r.to_map()));
    }
    value.read_lock::<Map>().map(|m| f(&m))
}

pub fn is_record_or_map(value: &Dynamic) -> bool {
    value.is_map() || value.read_lock::<Rec>().is_some()
}

fn display(ctx: NativeCallContext, r: &mut Rec) -> Result<ImmutableString, Box<rhai::EvalAltResult>> {
    ctx.call_native_fn::<ImmutableString>("to_debug", (Dynamic::from_map(r.to_map()),))
}

pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<Rec>("record")
        .register_indexer_get(|r: &mut Rec, key: &str| r.get(key).cloned().unwrap_or(Dynamic::UNIT))
        .register_fn("keys", |r: &mut Rec| r.keys())
        .register_fn("values", |r: &mut Rec| {
            r.keys().iter().map(|k| r.get(&k.to_string()).cloned().unwrap_or_default()).collect::<Array>()
        })
        .register_fn("len", |r: &mut Rec| r.keys().len() as rhai::INT)
        .register_fn("is_empty", |r: &mut Rec| r.map.is_empty() && r.estimate.is_none())
        .register_fn("contains", |r: &mut Rec, key: &str| r.get(key).is_some())
        .register_fn("get", |r: &mut Rec, key: &str| r.get(key).cloned().unwrap_or(Dynamic::UNIT))
        .register_fn("to_map", |r: &mut Rec| r.to_map())
        .register_fn("==", |a: &mut Rec, b: Rec| Arc::ptr_eq(&a.map, &b.map))
        .register_fn("!=", |a: &mut Rec, b: Rec| !Arc::ptr_eq(&a.map, &b.map));
    for name in ["to_string", "to_debug", "print", "debug"] {
        FuncRegistration::new(name).register_into_engine(engine, display);
    }
}
