//! The values a policy returns besides workers: `reject(..)`, `wait(..)`,
//! `dispatch(..)` and actions such as `evict(..)` or `start_worker(..)`.
//!
//! They are custom types rather than maps so that a script cannot forge one by
//! accident with a map literal, and so that a wrong return value is easy to
//! name in an error.

use rhai::{Dynamic, Engine, ImmutableString, Map};

/// HTTP statuses a policy may choose for `reject(code, status)`.
pub const REJECT_STATUSES: &[i64] = &[400, 403, 404, 409, 429, 503];
/// Codes that mean "try again later" and so answer 429 by default.
pub const CODES_429: &[&str] = &["quota_exceeded", "rate_limited", "queue_full", "capacity"];

#[derive(Clone, Debug)]
pub struct Reject {
    pub code: ImmutableString,
    pub status: i64,
}

#[derive(Clone, Debug)]
pub struct Wait {
    pub reason: ImmutableString,
    pub ms: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct Dispatch {
    pub worker_id: ImmutableString,
}

#[derive(Clone, Debug)]
pub struct Action {
    /// `"evict"` or `"start_worker"`.
    pub kind: &'static str,
    pub fields: Map,
}

fn opt_int(v: Option<i64>) -> Dynamic {
    v.map_or(Dynamic::UNIT, Dynamic::from_int)
}

impl Reject {
    pub fn new(code: ImmutableString, status: Option<i64>) -> Result<Self, String> {
        let status = match status {
            Some(s) if REJECT_STATUSES.contains(&s) => s,
            Some(s) => {
                return Err(format!(
                    "reject(\"{code}\", {s}): status must be one of 400, 403, 404, 409, 429, 503"
                ))
            }
            None if CODES_429.contains(&code.as_str()) => 429,
            None => 503,
        };
        Ok(Reject { code, status })
    }

    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("decision".into(), "reject".into());
        m.insert("code".into(), self.code.clone().into());
        m.insert("status".into(), Dynamic::from_int(self.status));
        m
    }
}

impl Wait {
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("decision".into(), "wait".into());
        m.insert("reason".into(), self.reason.clone().into());
        m.insert("ms".into(), opt_int(self.ms));
        m
    }
}

impl Dispatch {
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("decision".into(), "dispatch".into());
        m.insert("worker_id".into(), self.worker_id.clone().into());
        m
    }
}

impl Action {
    pub fn to_map(&self) -> Map {
        let mut m = self.fields.clone();
        m.insert("action".into(), self.kind.into());
        m
    }
}

fn show(m: &Map) -> String {
    let mut parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    parts.sort();
    parts.join(", ")
}

/// Registers the types with display forms and read-only properties.
pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<Reject>("Reject")
        .register_fn("to_string", |r: &mut Reject| format!("reject({})", show(&r.to_map())))
        .register_fn("to_debug", |r: &mut Reject| format!("reject({})", show(&r.to_map())))
        .register_get("code", |r: &mut Reject| r.code.clone())
        .register_get("status", |r: &mut Reject| r.status);
    engine
        .register_type_with_name::<Wait>("Wait")
        .register_fn("to_string", |w: &mut Wait| format!("wait({})", show(&w.to_map())))
        .register_fn("to_debug", |w: &mut Wait| format!("wait({})", show(&w.to_map())))
        .register_get("reason", |w: &mut Wait| w.reason.clone())
        .register_get("ms", |w: &mut Wait| opt_int(w.ms));
    engine
        .register_type_with_name::<Dispatch>("Dispatch")
        .register_fn("to_string", |d: &mut Dispatch| format!("dispatch({})", d.worker_id))
        .register_fn("to_debug", |d: &mut Dispatch| format!("dispatch({})", d.worker_id))
        .register_get("worker_id", |d: &mut Dispatch| d.worker_id.clone());
    engine
        .register_type_with_name::<Action>("Action")
        .register_fn("to_string", |a: &mut Action| format!("action({})", show(&a.to_map())))
        .register_fn("to_debug", |a: &mut Action| format!("action({})", show(&a.to_map())))
        .register_get("action", |a: &mut Action| ImmutableString::from(a.kind))
        .register_fn("to_map", |a: &mut Action| a.to_map())
        .register_indexer_get(|a: &mut Action, key: &str| {
            a.fields.get(key).cloned().unwrap_or(Dynamic::UNIT)
        });
}
